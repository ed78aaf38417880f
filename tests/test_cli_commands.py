"""The commands on a tiny run, as a user types them: repeated --set, outputs checked before any compute, transcoder
names and the featured CLT of a study directory, Ctrl-C, and one-line messages."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import random_images
from tests.test_browser import make_run
from vitclt.cli import main
from vitclt.errors import ConfigError
from vitclt.eval.suite import pick_transcoder

STUDY = ("clt-jumprelu", "clt-relu-topk", "sae-relu-topk")
"""The transcoders of the fake study directory, in training order (all copies of one CLT, named as reproduce names them)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_backbone):
    """A run with one CLT, an image, and a study directory (what `vitclt demo` writes: OUT/train/NAME, OUT/train/run.json)."""
    root = tmp_path_factory.mktemp("cli")
    run, spec = make_run(root, tiny_backbone)
    image = root / "photo.png"
    random_images(1, seed=5)[0].save(image)
    study = root / "study"
    for name in STUDY:
        shutil.copytree(run / "clt", study / "train" / name)
    (study / "train" / "run.json").write_text(json.dumps({"command": "demo", "transcoders": list(STUDY)}))
    return SimpleNamespace(run=run, spec=spec, image=image, study=study, backbone=tiny_backbone)


def _active_features(tiny, n: int = 2) -> list[tuple[int, int]]:
    """(layer, feature) of the most active feature of each of the first `n` layers on the test image."""
    from vitclt.circuits.intervene import clean_pass
    from vitclt.nn.transcoder import Transcoder

    tc = Transcoder.from_pretrained(tiny.run / "clt")
    clean = clean_pass(tiny.backbone, tc, tiny.backbone.preprocess(random_images(1, seed=5)))
    return [(layer, int(clean.codes[layer].to_dense(tc.n_features).sum(0).argmax())) for layer in range(n)]


def _intervene(tiny, out: Path, *sets: str, run: Path | None = None) -> dict:
    main(["intervene", str(run or tiny.run), "--image", str(tiny.image), "--classes", tiny.spec, "--target", "red car",
          "--device", "cpu", *sets, "--out", str(out)])
    return json.loads(out.read_text())


def test_two_set_flags_apply_both_like_one_set_with_two_values(tiny, tmp_path, capsys):
    (l0, f0), (l1, f1) = _active_features(tiny)
    a, b = f"{l0}:{f0}*0", f"{l1}:{f1}@cls=3"
    repeated = _intervene(tiny, tmp_path / "repeated.json", "--set", a, "--set", b)
    together = _intervene(tiny, tmp_path / "together.json", "--set", a, b)
    only_b = _intervene(tiny, tmp_path / "b.json", "--set", b)
    assert repeated["interventions"] == [a, b] and len(repeated["changes"]) == 2
    assert repeated == together
    assert repeated["predicted"] != only_b["predicted"] and repeated["replacement"] != only_b["replacement"]
    # Scaling lists only the tokens that changed, not every inactive token as 0→0.
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if ln.startswith(f"layer {l0} feature {f0}:"))
    assert "→0" in line and " 0→0" not in line


def test_scaling_an_inactive_feature_says_nothing_changed(tiny, tmp_path, capsys):
    from tests.test_browser import DEAD

    _intervene(tiny, tmp_path / "dead.json", "--set", f"{DEAD[0]}:{DEAD[1]}*2", "--no-predict")
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"layer {DEAD[0]} feature {DEAD[1]}:"))
    assert "no change" in line and "→" not in line


@pytest.mark.parametrize("command", ["intervene", "explain", "eval", "zeroshot", "browse"])
def test_a_bad_output_is_one_line_before_any_model_loads(tiny, tmp_path, capsys, monkeypatch, command):
    import vitclt.backbones

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(vitclt.backbones, "load_backbone", refuse)
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    common = {"intervene": [str(tiny.run), "--image", str(tiny.image), "--classes", tiny.spec, "--set", "0:1=0"],
              "explain": [str(tiny.run), "--image", str(tiny.image), "--classes", tiny.spec],
              "eval": [str(tiny.run), "--dataset", tiny.spec], "zeroshot": ["--backbone", "x", "--dataset", tiny.spec],
              "browse": [str(tiny.run), "--dataset", tiny.spec]}[command]
    # A file where a directory must be; for commands that write one file, also a directory as that file.
    outs = [tmp_path / "file" / "result.json"] + ([tmp_path / "folder"] if command in ("intervene", "zeroshot") else [])
    for out in outs:
        with pytest.raises(SystemExit) as exit_info:
            main([command, *common, "--device", "cpu", "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "--out" in err, err


def test_transcoder_names_of_metrics_json_and_of_the_run_root_both_work(tiny):
    want = tiny.study / "train" / "clt-jumprelu"
    for root in (tiny.study, tiny.study / "train"):
        for name in ("clt-jumprelu", "train-clt-jumprelu"):
            if root.name == "train" and name.startswith("train-"):
                continue
            assert pick_transcoder(root, name) == ("clt-jumprelu", want)
    for name in ("jumprelu", "nothing"):
        with pytest.raises(ConfigError, match="no transcoder named"):
            pick_transcoder(tiny.study, name)


def test_a_study_directory_defaults_to_its_featured_clt(tiny, tmp_path, capsys):
    from vitclt.eval import suite
    from vitclt.training import checkpoint

    assert suite.RUN_FILE == checkpoint.RUN_FILE
    assert pick_transcoder(tiny.study) == ("clt-relu-topk", tiny.study / "train" / "clt-relu-topk")
    assert pick_transcoder(tiny.study / "train")[0] == "clt-relu-topk"
    assert "featured clt-relu-topk" in capsys.readouterr().out
    # A run of `vitclt train` with several transcoders still asks which.
    plain = tmp_path / "plain"
    for name in STUDY:
        shutil.copytree(tiny.run / "clt", plain / name)
    with pytest.raises(ConfigError, match="--transcoder NAME"):
        pick_transcoder(plain)
    # End to end: intervene from the study directory, no --transcoder.
    report = _intervene(tiny, tmp_path / "iv.json", "--set", "0:1=0", "--no-predict", run=tiny.study)
    assert report["changes"] and "featured clt-relu-topk" in capsys.readouterr().out


def test_the_browser_of_a_study_opens_on_its_featured_clt_and_explain_links_it(tiny, tmp_path):
    from tests.test_browser import read_data
    from vitclt.browser import build_browser

    site = build_browser(tiny.study / "train", tiny.spec, images_per_forward=8, top_k=2, samples=2, vocab_size=0,
                         exports=False, progress=False)
    try:
        transcoders = read_data(site / "data" / "site.js")["transcoders"]
        assert transcoders[0]["name"] == "clt-relu-topk" and sorted(t["name"] for t in transcoders) == sorted(STUDY)
        # explain from the study directory: the featured CLT, linked to its page in the browser beside it.
        out = tmp_path / "viewer"
        main(["explain", str(tiny.study), "--image", str(tiny.image), "--classes", tiny.spec, "--effects-top", "0",
              "--device", "cpu", "--out", str(out)])
        meta = json.loads((out / "graph.json").read_text())["meta"]
        assert meta["transcoder"] == "clt-relu-topk" and meta["browser"]["tc"] == transcoders[0]["id"]
    finally:
        shutil.rmtree(site)


def test_a_missing_run_dir_says_its_fix_once(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["explain", str(tmp_path / "nowhere"), "--image", "x.png", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.count("vitclt train") == 1 and "does not exist" in err


def test_ctrl_c_is_one_line_exit_130_and_keeps_what_was_written(tiny, tmp_path):
    """SIGINT during training: one line, exit code 130, no traceback; the run's files are whole or absent."""
    out = tmp_path / "train"
    args = [sys.executable, "-m", "vitclt.cli", "train", "--backbone", str(tiny.backbone.name), "--dataset", tiny.spec,
            "--split", "test", "--steps", "100000", "--batch-size", "16", "--buffer-size", "64", "--norm-tokens", "64",
            "--expansion", "1", "--k", "2", "--workers", "0", "--device", "cpu", "--threads", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "VITCLT_DEBUG": ""}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / "run.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # training has started once run.json exists
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "vitclt train: interrupted; earlier output kept (every file written before it " \
                                          "is complete)"
    assert not [p for p in out.rglob("*.tmp")], "a half-written temporary was left behind"
    json.loads((out / "run.json").read_text())


def test_ctrl_c_before_anything_is_written_says_so(tmp_path):
    code = ("import time, vitclt.cli as cli; cli.COMMANDS['zeroshot'] = cli.COMMANDS['zeroshot']._replace("
            "run=lambda cfg: (print('ready', flush=True), time.sleep(60))); cli.main(['zeroshot'])")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err.strip() == "vitclt zeroshot: interrupted; nothing written"


@pytest.mark.parametrize("args", [["zeroshot", "--ablate-layers", "0", "2-1"], ["eval", "RUN", "--windows", "2-1"],
                                  ["reproduce", "--windows", "2-1", "--out", "OUT"], ["zeroshot", "--ablate-layers", "x-1"]])
def test_windows_are_checked_before_anything_loads(args, tmp_path, capsys, monkeypatch):
    import vitclt.backbones
    import vitclt.data.datasets

    def refuse(*a, **kw):
        raise AssertionError("something was loaded before the windows were checked")

    monkeypatch.setattr(vitclt.backbones, "load_backbone", refuse)
    monkeypatch.setattr(vitclt.data.datasets, "load_dataset", refuse)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / a) if a in ("RUN", "OUT") else a for a in args] + ["--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert ("is reversed: write START-END with START ≤ END, e.g. 1-2" if "2-1" in args else "cannot read layer window") in err


def test_reproduce_checks_its_browser_output_before_training(tmp_path, capsys, monkeypatch):
    import vitclt.training.runner

    def refuse(*a, **kw):
        raise AssertionError("training started before the outputs were checked")

    monkeypatch.setattr(vitclt.training.runner, "train", refuse)
    (tmp_path / "out" / "train" / "browser").mkdir(parents=True)
    (tmp_path / "out" / "train" / "browser" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["reproduce", "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was not written by vitclt browse" in err
    assert (tmp_path / "out" / "train" / "browser" / "notes.txt").read_text() == "mine"


def test_of_a_sweep_over_k_the_featured_clt_is_the_relu_topk_clt_at_the_middle_k(tmp_path):
    from vitclt.eval.suite import featured_transcoder

    models = (("clt-jumprelu-k8", "clt", "jumprelu", 8), ("plt-relu-topk-k16", "plt", "relu-topk", 16),
              ("clt-relu-topk-k32", "clt", "relu-topk", 32), ("clt-relu-topk-k8", "clt", "relu-topk", 8),
              ("clt-relu-topk-k16", "clt", "relu-topk", 16))
    paths = {}
    for name, topology, sparsifier, k in models:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"topology": topology, "sparsifier": sparsifier, "k": k}))
        paths[name] = tmp_path / name
    assert featured_transcoder(paths) == "clt-relu-topk-k16"
    no_topk_clt = {n: p for n, p in paths.items() if "relu-topk" not in n or n.startswith("plt")}
    assert featured_transcoder(no_topk_clt) == "clt-jumprelu-k8"
    assert featured_transcoder({"plt-relu-topk-k16": paths["plt-relu-topk-k16"]}) is None
