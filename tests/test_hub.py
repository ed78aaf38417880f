"""Transcoders by hub id (resolved offline from a prepared hub cache) and `vitclt push` (staged, HfApi recorded)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from vitclt.errors import ConfigError, InputNotFoundError, OutputError
from vitclt.nn import Transcoder, TranscoderConfig
from vitclt.nn.hub import HubError, parse_hub_id, resolve_source

SHA = "a" * 40
OTHER_SHA = "b" * 40


def _transcoder(seed=0, L=3, D=8, F=16, **kw):
    torch.manual_seed(seed)
    cfg = TranscoderConfig(n_layers=L, d_model=D, n_features=F, k=2, topology="clt", sparsifier="relu-topk", **kw)
    return Transcoder(cfg)


def _publish(cache: Path, repo: str, source: Path, sha: str = SHA, ref: str | None = "main") -> Path:
    """Put `source`'s files into the hub cache layout huggingface_hub reads: snapshots/<sha>/ and refs/<ref>."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / sha
    shutil.copytree(source, snapshot)
    if ref:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(sha)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache in HF_HUB_CACHE, offline, with the working directory in a fresh folder."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hub_ids_parse_with_prefix_and_revision():
    assert parse_hub_id("org/repo") == ("org/repo", None)
    assert parse_hub_id("hf:org/re.po-1@v2") == ("org/re.po-1", "v2")
    for not_an_id in ("repo", "./org/repo", "/abs/org/repo", "a/b/c", "org/../x", "org/repo@"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_from_pretrained_resolves_a_hub_id_from_the_cache_offline(hub_cache, tmp_path):
    main, v1 = _transcoder(seed=0), _transcoder(seed=1)
    _publish(hub_cache, "org/repo", main.save_pretrained(tmp_path / "main"))
    _publish(hub_cache, "org/repo", v1.save_pretrained(tmp_path / "v1"), sha=OTHER_SHA, ref="v1")
    expected_main = _weights(Transcoder.from_pretrained(tmp_path / "main"))
    expected_v1 = _weights(Transcoder.from_pretrained(tmp_path / "v1"))
    assert not _same(expected_main, expected_v1)
    for spec in ("org/repo", "hf:org/repo", f"org/repo@{SHA}", "org/repo@main"):
        assert _same(_weights(Transcoder.from_pretrained(spec)), expected_main), spec
    for spec in ("org/repo@v1", f"hf:org/repo@{OTHER_SHA}"):
        assert _same(_weights(Transcoder.from_pretrained(spec)), expected_v1), spec


def test_a_local_directory_wins_unless_it_holds_no_transcoder(hub_cache, tmp_path):
    _publish(hub_cache, "org/repo", _transcoder(seed=0).save_pretrained(tmp_path / "hub"))
    hub_weights = _weights(Transcoder.from_pretrained(tmp_path / "hub"))
    local = _transcoder(seed=3).save_pretrained(Path("org/repo"))
    local_weights = _weights(Transcoder.from_pretrained(local))
    assert _same(_weights(Transcoder.from_pretrained("org/repo")), local_weights)
    assert _same(_weights(Transcoder.from_pretrained("hf:org/repo")), hub_weights)
    # What `vitclt eval org/repo` writes (./org/repo/eval) must not hide the hub repo next time.
    shutil.rmtree("org")
    Path("org/repo/eval").mkdir(parents=True)
    (Path("org/repo/eval") / "metrics.json").write_text("{}")
    assert resolve_source("org/repo").hub is not None
    assert _same(_weights(Transcoder.from_pretrained("org/repo")), hub_weights)


def test_an_uncached_repo_offline_is_one_line_naming_the_repo_and_the_fix(hub_cache):
    with pytest.raises(HubError) as err:
        Transcoder.from_pretrained("someone/missing@v3")
    message = str(err.value)
    assert "\n" not in message
    for part in ("someone/missing@v3", "HF_HUB_OFFLINE", "hf download someone/missing", "pass that directory"):
        assert part in message, part
    with pytest.raises(ConfigError, match="not a hub id"):
        resolve_source("hf:not-an-id")


def test_eval_browse_explain_and_intervene_find_a_hub_transcoder(hub_cache, tmp_path):
    from vitclt.browser.build import _load_transcoders
    from vitclt.circuits.inputs import find_transcoder
    from vitclt.eval.suite import find_transcoders

    snapshot = _publish(hub_cache, "org/my-clt", _transcoder().save_pretrained(tmp_path / "tc"))
    assert find_transcoders("org/my-clt") == {"my-clt": snapshot}
    assert find_transcoders(Path("hf:org/my-clt")) == {"my-clt": snapshot}
    assert find_transcoder(Path("org/my-clt")) == ("my-clt", snapshot)
    assert _load_transcoders(Path("org/my-clt"), None) == {"my-clt": snapshot}
    # A repo holding several transcoders in folders reads like a run directory.
    run = tmp_path / "run"
    for name in ("clt", "plt"):
        _transcoder().save_pretrained(run / name)
    snapshot = _publish(hub_cache, "org/run", run)
    assert find_transcoders("org/run") == {"clt": snapshot / "clt", "plt": snapshot / "plt"}


def test_a_hub_transcoder_trained_on_other_backbone_weights_is_refused(hub_cache, tmp_path, tiny_backbone):
    from vitclt.circuits.errors import CircuitError
    from vitclt.circuits.inputs import check_transcoder
    from vitclt.eval.suite import find_transcoders, load_transcoders

    shape = dict(L=tiny_backbone.n_layers, D=tiny_backbone.d_model, backbone="tiny")
    _publish(hub_cache, "org/other", _transcoder(**shape, backbone_fingerprint="0" * 16).save_pretrained(tmp_path / "o"))
    _publish(hub_cache, "org/same", _transcoder(**shape, backbone_fingerprint=tiny_backbone.fingerprint)
             .save_pretrained(tmp_path / "s"))
    with pytest.raises(ConfigError, match="fingerprint"):
        load_transcoders(find_transcoders("org/other"), tiny_backbone)
    with pytest.raises(CircuitError, match="fingerprint"):
        check_transcoder(Transcoder.from_pretrained("org/other"), tiny_backbone)
    assert list(load_transcoders(find_transcoders("org/same"), tiny_backbone)) == ["same"]
    check_transcoder(Transcoder.from_pretrained("org/same"), tiny_backbone)


# vitclt push ---------------------------------------------------------------------------------


def _metrics(name: str, path: Path) -> dict:
    """A metrics.json with the keys the headline reads, values distinct so the card's can be traced."""
    rec = {"l0": 16.0, "r2": 0.8123, "cosine": 0.9045}
    faith = {"k": 2, "drop_top1": {"top1": 41.0}, "drop_random": {"top1": 52.5},
             "keep_topk": {"top1": 60.25}, "keep_random": {"top1": 33.75}}
    return {
        "windows": ["0-2", "2-2"], "tokens": ["all"], "baseline": {"top1": 71.5, "n_images": 40},
        "zero_ablation": {"0-2": {"all": 10.0}, "2-2": {"all": 50.0}},
        "dataset": {"spec": "demo", "name": "demo", "split": "test", "n_images": 40},
        "backbone": {"name": "demo"},
        "transcoders": {name: {"path": str(path), "reconstruction": {"all": {"mean": rec}},
                               "replacement": {"0-2": {"all": {"top1": 44.25}}, "2-2": {"all": {"top1": 66.75}}},
                               "faithfulness": {"all": faith}}},
    }


@pytest.fixture
def run_dir(tmp_path):
    """A training run with one CLT (config, weights, training.json) and an evaluation of it in RUN/eval."""
    run = tmp_path / "run"
    tc = _transcoder(backbone="openai/clip-vit-base-patch32", backbone_fingerprint="f1e2d3c4b5a69788").save_pretrained(
        run / "clt-relu-topk")
    (tc / "training.json").write_text(json.dumps({"step": 1234, "tokens": 5_050_000, "finished": True,
                                                  "train_config": {"dataset": "cifar100:/data/c100", "split": "train"}}))
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps(_metrics("clt-relu-topk", tc)))
    return run


def _push(run, repo="me/clt", **kw):
    from vitclt.commands.push import PushConfig
    from vitclt.commands.push import run as push
    from vitclt.runtime import RuntimeConfig

    return push(PushConfig(run, repo, runtime=RuntimeConfig(device="cpu", workers=0, progress=False), **kw))


def test_push_dry_run_stages_weights_config_and_a_card_with_its_sources(run_dir, tmp_path):
    out = tmp_path / "staged"
    _push(run_dir, dry_run=out)
    tc = run_dir / "clt-relu-topk"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == (tc / "model.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((tc / "config.json").read_text())
    card = (out / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: vitclt" in front and "- clt" in front and "- relu-topk" in front
    for expected in ("openai/clip-vit-base-patch32", "f1e2d3c4b5a69788", "cifar100:/data/c100", "| tokens | all |",
                     "| k (active features per token and layer) | 2 |", "| features per layer | 16 |", "| 1234 |",
                     "5,050,000", 'Transcoder.from_pretrained("me/clt")', "eval/metrics.json",
                     "| 0.8123 | `transcoders.clt-relu-topk.reconstruction.all.mean.r2` |",
                     "| 0.9045 | `transcoders.clt-relu-topk.reconstruction.all.mean.cosine` |",
                     "| 44.25 | `transcoders.clt-relu-topk.replacement.0-2.all.top1` |",
                     "| 66.75 | `transcoders.clt-relu-topk.replacement.2-2.all.top1` |",
                     "| 71.50 | `baseline.top1` |", "| 41.00 | `transcoders.clt-relu-topk.faithfulness.all.drop_top1.top1` |",
                     "| 60.25 | `transcoders.clt-relu-topk.faithfulness.all.keep_topk.top1` |"):
        assert expected in body, expected


def test_a_card_without_an_evaluation_says_where_it_looked(run_dir, tmp_path):
    shutil.rmtree(run_dir / "eval")
    _push(run_dir / "clt-relu-topk", dry_run=tmp_path / "staged")
    card = (tmp_path / "staged" / "README.md").read_text()
    assert "No evaluation was found" in card and "metrics.json" in card and "vitclt eval me/clt" in card


def test_a_pushed_folder_loads_back_by_its_hub_id(run_dir, hub_cache, tmp_path):
    _push(run_dir, dry_run=tmp_path / "staged")
    _publish(hub_cache, "me/clt", tmp_path / "staged")
    original = Transcoder.from_pretrained(run_dir / "clt-relu-topk")
    assert _same(_weights(Transcoder.from_pretrained("me/clt")), _weights(original))


class _RecordingApi:
    """Stands in for huggingface_hub.HfApi: records each call and the files of the uploaded folder."""

    calls: list = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        files = sorted(p.name for p in Path(kw["folder_path"]).iterdir())
        self.calls.append(("upload_folder", kw["repo_id"], {**kw, "files": files}))
        return "https://huggingface.co/me/clt/commit/123"


def test_push_creates_the_repo_and_uploads_the_staged_folder_in_one_commit(run_dir, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", _RecordingApi)
    _RecordingApi.calls = []
    url = _push(run_dir, private=True, revision="exp", commit_message="first")
    assert url.endswith("/commit/123")
    names = [c[0] for c in _RecordingApi.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert _RecordingApi.calls[0][2]["private"] is True and _RecordingApi.calls[0][2]["exist_ok"] is True
    assert _RecordingApi.calls[1][2]["branch"] == "exp"
    upload = _RecordingApi.calls[2][2]
    assert upload["files"] == ["README.md", "config.json", "model.safetensors"]
    assert (upload["revision"], upload["commit_message"], upload["repo_id"]) == ("exp", "first", "me/clt")
    assert not Path(upload["folder_path"]).exists()  # the staging folder is cleaned up


def test_push_refuses_offline_and_bad_inputs_in_one_line(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="--dry-run"):
        _push(run_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputNotFoundError, match="no transcoder"):
        _push(empty, dry_run=tmp_path / "a")
    _transcoder().save_pretrained(run_dir / "plt-relu-topk")
    with pytest.raises(ConfigError, match=r"2 transcoders \(clt-relu-topk, plt-relu-topk\).*--transcoder NAME"):
        _push(run_dir, dry_run=tmp_path / "b")
    _push(run_dir, transcoder="plt-relu-topk", dry_run=tmp_path / "c")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="--dry-run"):
        _push(run_dir, transcoder="plt-relu-topk", dry_run=tmp_path / "file" / "staged")
    with pytest.raises(OutputError, match="already holds"):
        _push(run_dir, transcoder="plt-relu-topk", dry_run=tmp_path / "c")
    with pytest.raises(ConfigError, match="not a hub repository id"):
        _push(run_dir, repo="just-a-name", transcoder="plt-relu-topk", dry_run=tmp_path / "d")


def test_the_push_command_line_prints_one_line_errors(run_dir, tmp_path, capsys):
    from vitclt.cli import main

    main(["push", str(run_dir), "me/clt", "--dry-run", str(tmp_path / "out"), "--device", "cpu"])
    assert (tmp_path / "out" / "README.md").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["push", str(tmp_path / "nowhere"), "me/clt", "--dry-run", str(tmp_path / "out2")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err


def test_push_finds_the_evaluation_of_a_copied_or_moved_run(run_dir, tmp_path):
    # metrics.json as older versions wrote it: an absolute path, which no longer exists once the run is moved.
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(str(run_dir), moved)
    _push(moved, dry_run=tmp_path / "moved")
    assert "| 44.25 | `transcoders.clt-relu-topk.replacement.0-2.all.top1` |" in (tmp_path / "moved" / "README.md").read_text()
    # As eval writes it now: relative to metrics.json, so a copy finds its own transcoder by path.
    metrics = json.loads((moved / "eval" / "metrics.json").read_text())
    metrics["transcoders"]["renamed"] = metrics["transcoders"].pop("clt-relu-topk") | {"path": "../clt-relu-topk"}
    (moved / "eval" / "metrics.json").write_text(json.dumps(metrics))
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    _push(copy, dry_run=tmp_path / "copied")
    assert "`transcoders.renamed.replacement.0-2.all.top1`" in (tmp_path / "copied" / "README.md").read_text()


def test_push_from_a_study_directory_matches_the_metrics_json_name(tmp_path, capsys):
    study = tmp_path / "demo"
    tc = _transcoder().save_pretrained(study / "train" / "clt-relu-topk")
    _transcoder(seed=1).save_pretrained(study / "train" / "clt-jumprelu")
    (study / "train" / "run.json").write_text(json.dumps({"command": "demo", "transcoders": ["clt-jumprelu", "clt-relu-topk"]}))
    (study / "eval").mkdir()
    (study / "eval" / "metrics.json").write_text(json.dumps(_metrics("clt-relu-topk", Path("/gone/clt-relu-topk"))))
    for name in (None, "clt-relu-topk", "train-clt-relu-topk"):
        out = tmp_path / f"staged-{name}"
        _push(study, transcoder=name, dry_run=out)
        card = (out / "README.md").read_text()
        assert "# clt-relu-topk" in card and "`transcoders.clt-relu-topk.replacement.0-2.all.top1`" in card, name
    capsys.readouterr()
    _push(study, transcoder="clt-jumprelu", dry_run=tmp_path / "other")
    card = (tmp_path / "other" / "README.md").read_text()
    assert "metrics.json has no entry for clt-jumprelu (it holds clt-relu-topk)" in card
    assert "metrics.json has no entry for clt-jumprelu" in capsys.readouterr().out
    assert (tc / "model.safetensors").read_bytes() == (tmp_path / "staged-None" / "model.safetensors").read_bytes()


def test_push_dry_run_without_a_directory_stages_into_a_printed_temporary_one(run_dir, capsys):
    from vitclt.cli import main

    main(["push", str(run_dir), "me/clt", "--dry-run", "--device", "cpu"])
    printed = capsys.readouterr().out
    folder = Path(printed.split("temporary directory ", 1)[1].split()[0])
    try:
        assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
        assert str(folder) in printed.splitlines()[-1]
    finally:
        shutil.rmtree(folder)


def test_eval_records_paths_in_the_run_relative_to_metrics_json(tmp_path):
    from vitclt.commands.eval import run_relative

    run = tmp_path / "run"
    (run / "clt").mkdir(parents=True)
    assert run_relative(run / "clt", run, run / "eval") == "../clt" and run_relative(run, run, run / "eval") == ".."
    assert run_relative(tmp_path / "cache" / "tc", run, run / "eval") == str(tmp_path / "cache" / "tc")
    assert run_relative("org/repo", "org/repo", tmp_path / "out") == "org/repo"
