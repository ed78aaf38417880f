"""`vitclt reproduce`: the five models on one stream, then the combined report."""

import json

import pytest

from vitclt.cli import parse
from vitclt.commands.reproduce import PAPER_MODELS, ReproduceConfig, run
from vitclt.eval.options import EvalOptions, HeadOptions
from vitclt.nn import TranscoderConfig
from vitclt.runtime import RuntimeConfig
from vitclt.training.config import OptimConfig, SweepConfig

from .conftest import write_image_folder

FIVE = ["clt-abs-topk", "clt-jumprelu", "clt-relu-topk", "plt-relu-topk", "sae-relu-topk"]


def test_one_run_trains_the_paper_sparsifiers_and_the_baselines(tmp_path):
    from vitclt.training import transcoder_configs

    cfg = ReproduceConfig(out=tmp_path, sweep=SweepConfig(models=PAPER_MODELS, k=(8,)),
                          optim=OptimConfig(steps=50, warmup_steps=None), max_images=100)
    tcfg = cfg.train_config()
    assert tcfg.sweep.k == (8,) and tcfg.optim.warmup == 5 and tcfg.out == tmp_path / "train"
    assert cfg.eval_config().out_dir == tmp_path / "eval" and cfg.eval_config().run_dir == tmp_path / "train"
    models = transcoder_configs(tcfg, n_layers=3, d_model=32)
    assert sorted(models) == FIVE
    assert {m.k for m in models.values()} == {8}
    assert [(m.topology, m.sparsifier) for m in models.values()][3:] == [("plt", "relu-topk"), ("sae", "relu-topk")]
    clts_only = ReproduceConfig(out=tmp_path, sweep=SweepConfig(sparsifier=("jumprelu", "relu-topk", "abs-topk")))
    assert sorted(transcoder_configs(clts_only.train_config(), n_layers=3, d_model=32)) == ["abs-topk", "jumprelu", "relu-topk"]


def test_quick_caps_the_sizes():
    cfg = ReproduceConfig(quick=True, max_images=96, optim=OptimConfig(steps=1000)).sized()
    assert (cfg.max_images, cfg.optim.steps, cfg.eval_images, cfg.evaluation.seeds, cfg.quick) == (96, 100, 160, 2, False)
    assert ReproduceConfig().sized() == ReproduceConfig()


def test_one_head_flag_for_eval_reproduce_and_zeroshot_and_the_studys_probe_sees_its_training_images():
    flags = ["--head", "probe", "--probe-split", "val", "--probe-images", "7"]
    tasks = {"eval": parse(["eval", "run", *flags])[1].options.task,
             "reproduce": parse(["reproduce", *flags])[1].evaluation.task,
             "zeroshot": parse(["zeroshot", *flags])[1].task}
    assert all(t == HeadOptions(head="probe", probe_split="val", probe_images=7) for t in tasks.values()), tasks
    assert ReproduceConfig(max_images=50).eval_config().options.task.probe_images == 50
    explicit = EvalOptions(task=HeadOptions(head="probe", probe_images=7))
    assert ReproduceConfig(max_images=50, evaluation=explicit).eval_config().options.task.probe_images == 7


@pytest.mark.slow
def test_reproduce_end_to_end(tmp_path, tiny_clip_dir, capsys):
    write_image_folder(tmp_path / "img", ["cat", "dog"], 3, seed=20)
    report = run(ReproduceConfig(backbone=str(tiny_clip_dir), dataset=f"folder:{tmp_path / 'img'}", out=tmp_path / "out",
                                 sweep=SweepConfig(models=PAPER_MODELS, k=(4,)), transcoder=TranscoderConfig(expansion=2),
                                 optim=OptimConfig(steps=2, batch_size=32, warmup_steps=None),
                                 evaluation=EvalOptions(seeds=1, windows=("last:1",)),
                                 runtime=RuntimeConfig(workers=1, threads=1, progress=False)))
    assert report == tmp_path / "out" / "eval" / "report.html" and report.is_file()
    assert f"report: {report}" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "out" / "eval" / "metrics.json").read_text())
    assert sorted(metrics["comparison"]) == FIVE and metrics["windows"] == ["2-2"]
    assert metrics["context"]["train"]["sweep"]["models"] == list(PAPER_MODELS)
    assert json.loads((tmp_path / "out" / "train" / "run.json").read_text())["command"] == "reproduce"
    assert sum(e["topology"] == "clt" for e in metrics["transcoders"].values()) == 3
