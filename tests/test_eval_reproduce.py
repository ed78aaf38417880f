"""`vitclt reproduce`: the five models on one stream, then the combined report."""

import json

import pytest
from vitclt.eval.reproduce import ReproduceConfig, run, train_config

from .conftest import write_image_folder


def test_one_run_trains_the_paper_sparsifiers_and_the_baselines(tmp_path):
    from vitclt.training import transcoder_configs

    tcfg = train_config(ReproduceConfig(out=tmp_path, k=8, steps=50, max_images=100))
    assert tcfg.k == (8,) and tcfg.warmup_steps == 5 and tcfg.out == tmp_path / "train"
    models = transcoder_configs(tcfg, n_layers=3, d_model=32)
    assert sorted(models) == ["clt-abs-topk", "clt-jumprelu", "clt-relu-topk", "plt-relu-topk", "sae-relu-topk"]
    assert {m.k for m in models.values()} == {8}
    assert [(m.topology, m.sparsifier) for m in models.values()][3:] == [("plt", "relu-topk"), ("sae", "relu-topk")]
    clts_only = transcoder_configs(train_config(ReproduceConfig(out=tmp_path, baselines=False)), n_layers=3, d_model=32)
    assert sorted(clts_only) == ["abs-topk", "jumprelu", "relu-topk"]  # one topology: no prefix


@pytest.mark.slow
def test_reproduce_end_to_end(tmp_path, tiny_clip_dir, capsys):
    write_image_folder(tmp_path / "img", ["cat", "dog"], 3, seed=20)
    report = run(ReproduceConfig(backbone=str(tiny_clip_dir), dataset=f"folder:{tmp_path / 'img'}", out=tmp_path / "out",
                                 steps=2, batch_size=32, k=4, expansion=2, seeds=1, workers=1, threads=1, progress=False))
    assert report == tmp_path / "out" / "eval" / "report.html" and report.is_file()
    assert f"report: {report}" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "out" / "eval" / "metrics.json").read_text())
    assert sorted(metrics["comparison"]) == ["clt-abs-topk", "clt-jumprelu", "clt-relu-topk", "plt-relu-topk", "sae-relu-topk"]
    assert metrics["context"]["train"]["models"] == ["clt:jumprelu", "clt:relu-topk", "clt:abs-topk", "plt:relu-topk", "sae:relu-topk"]
    assert sum(e["topology"] == "clt" for e in metrics["transcoders"].values()) == 3
