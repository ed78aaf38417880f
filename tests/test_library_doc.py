"""docs/library.md's example runs as written, on the shipped demo backbone and a briefly trained CLT."""

import re
from pathlib import Path

import torch

from vitclt.backbones import load_backbone
from vitclt.nn import Transcoder, TranscoderConfig

from .conftest import random_images

DOC = Path(__file__).resolve().parents[1] / "docs" / "library.md"


def python_blocks(markdown: str) -> list[str]:
    """The code of every ```python block, in order."""
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.S | re.M)


def _train_demo_transcoder(directory: Path) -> None:
    """A CLT on the demo backbone after a few steps on random images: enough for the example to mean something."""
    backbone = load_backbone("demo")
    with backbone.capture() as cap:
        backbone.image_embeds(backbone.preprocess(random_images(24, seed=3)))
    x_NLD, y_NLD = cap.x_BTLD().flatten(0, 1).clone(), cap.y_BTLD().flatten(0, 1).clone()
    torch.manual_seed(0)
    cfg = TranscoderConfig(n_layers=backbone.n_layers, d_model=backbone.d_model, expansion=2, k=8, backbone="demo")
    model = Transcoder(cfg)
    model.set_normalization(*Transcoder.normalization_stats(x_NLD), *Transcoder.normalization_stats(y_NLD))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(10):
        model(x_NLD, y_NLD).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(directory)


def test_the_library_example_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    _train_demo_transcoder(tmp_path / "runs" / "demo" / "relu-topk")
    random_images(1, seed=4, size=(48, 40))[0].save(tmp_path / "photo.png")
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # our own documentation
    printed = capsys.readouterr().out
    n_layers = namespace["transcoder"].n_layers
    assert printed.count("(feature, activation)") == n_layers
    assert "cosine of the image embedding" in printed
    assert namespace["acts_NLF"].shape == (17, n_layers, namespace["transcoder"].n_features)
    # The documented replacement puts exactly the decoded last layer into the forward.
    ns = namespace
    fn, returned = ns["LastLayerReconstruction"](), {}

    def recording(layer, x_BTD, y_BTD):
        returned[layer] = fn(layer, x_BTD, y_BTD)
        return returned[layer]

    with torch.no_grad(), ns["backbone"].replace(recording, layers=[ns["last"]]):
        ns["backbone"].image_embeds(ns["pixels_B3HW"])
    assert [layer for layer, out in returned.items() if out is not None] == [ns["last"]]
    torch.testing.assert_close(returned[ns["last"]][0], ns["y_hat_NLD"][:, ns["last"]], rtol=1e-5, atol=1e-5)
    assert not torch.equal(ns["clean_BP"], ns["replaced_BP"])


def test_the_setup_command_is_a_quick_run_that_writes_the_transcoder_the_example_loads():
    import shlex

    from vitclt.cli import parse
    from vitclt.training import transcoder_configs

    block = re.search(r"^```bash\n(.*?)^```$", DOC.read_text(encoding="utf-8"), flags=re.S | re.M).group(1)
    command = next(line for line in block.splitlines() if line.startswith("vitclt train"))
    name, cfg = parse(shlex.split(command, comments=True)[1:])
    cfg.validate()
    assert name == "train" and str(cfg.out) == "runs/demo"
    assert list(transcoder_configs(cfg, 6, 64)) == ["relu-topk"]  # runs/demo/relu-topk, as the example reads
    # The defaults train 10,000 steps of 4,096 rows (about 2 h on 2 CPUs); the documented run is about a minute.
    assert cfg.optim.steps * cfg.optim.batch_size <= 500_000 and cfg.max_images <= 1000
