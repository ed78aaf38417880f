"""The embedded default: an image world the project generates, and a small CLIP trained on it.

- `world`: procedurally rendered scenes (a coloured shape on a textured background) with captions
  and colour × shape labels; splits `train`, `test` and `unseen` (held-out combinations).
- `train_clip`: the script that trains the CLIP-architecture model shipped in `weights/`, which
  `vitclt.backbones.load_backbone("demo")` loads.
"""
