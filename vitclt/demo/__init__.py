"""`vitclt demo`: the main job on the embedded default.

The default's parts live where their kind does: the generated image world is the `demo` dataset
kind (`vitclt.data.world`), the small CLIP trained on it is an asset (`vitclt/assets/demo_clip/`,
loaded by `vitclt.backbones.load_backbone("demo")`), and the script that trains it is a tool of the
source checkout (`tools/train_demo_clip.py`).
"""
