"""The command line: composed configs with flat flags, one meaning per flag, --version, quiet progress, fast --help."""

import dataclasses
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

import vitclt
from vitclt.cli import COMMANDS, main, merge_repeated, parse
from vitclt.runtime import RuntimeConfig

EVERY = ["zeroshot", "train", "eval RUN", "reproduce", "demo"]


def _parse(command: str, *flags: str):
    return parse([*command.split(), *flags])[1]


def test_train_flags_are_flat_and_land_in_their_groups():
    cfg = _parse("train", "--k", "4", "8", "--expansion", "2", "--auxk-k", "3", "--lr", "0.1", "--buffer-size", "99",
                 "--workers", "3", "--no-progress", "--topology", "clt", "plt")
    assert cfg.sweep.k == (4, 8) and cfg.sweep.topology == ("clt", "plt")
    assert cfg.transcoder.expansion == 2 and cfg.transcoder.auxk_k == 3 and cfg.transcoder.k == 32
    assert cfg.optim.lr == 0.1 and cfg.stream.buffer_size == 99
    assert cfg.runtime.workers == 3 and cfg.runtime.progress is False


@pytest.mark.parametrize("command", EVERY)
def test_runtime_flags_mean_the_same_in_every_command(command):
    cfg = _parse(command, "--workers", "3", "--images-per-forward", "7", "--seed", "5", "--threads", "2", "--device",
                 "cpu", "--no-progress")
    assert cfg.runtime == RuntimeConfig(device="cpu", threads=2, workers=3, images_per_forward=7, seed=5, progress=False)


@pytest.mark.parametrize("command", ["zeroshot", "eval RUN"])
def test_batch_size_is_tokens_per_step_so_image_only_commands_have_none(command, capsys):
    with pytest.raises(SystemExit):
        _parse(command, "--batch-size", "8")
    assert "--batch-size" in capsys.readouterr().err


def test_version(capsys):
    main(["--version"])
    assert capsys.readouterr().out.strip() == f"vitclt {vitclt.__version__}"


def test_no_progress_silences_the_backbone_loading_bar():
    code = ("from transformers.utils import logging; from vitclt.runtime import RuntimeConfig, setup; "
            "a = logging.is_progress_bar_enabled(); setup(RuntimeConfig(device='cpu', progress=False)); "
            "print(a, logging.is_progress_bar_enabled())")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["True", "False"]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    # `plan` is arithmetic on shapes: it runs nothing, so it has no device.
    assert "--device" in capsys.readouterr().out or name == "plan"


def test_the_command_line_imports_no_torch():
    code = "import sys, vitclt.cli; print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


REQUIRED = {"eval": ["RUN"], "browse": ["RUN"], "explain": ["RUN"], "intervene": ["RUN", "--image", "x.png"],
            "push": ["RUN", "me/repo"]}
"""Each command's required arguments (intervene's --set is added where it is not the flag under test)."""
SAMPLES = {"--set": ("0:1=0", "1:2*0"), "--windows": ("0-1", "2"), "--ablate-layers": ("0-1", "2"),
           "--models": ("clt:jumprelu", "plt:relu-topk")}


def _list_flags_in_help(name: str, capsys, monkeypatch) -> dict[str, tuple[str, str]]:
    """Every flag whose --help metavar takes several values (`[X [X ...]]`), with two values it accepts."""
    import re

    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit):
        main([name, *REQUIRED.get(name, []), "--help"])
    found = {}
    for flag, metavar in re.findall(r"(--[a-z-]+) (?:\{None\}\|)?\{?\[(\S+) [^\n]*\.\.\.\]", capsys.readouterr().out):
        choices = re.match(r"\{([^}]*)\}", metavar)
        found[flag] = SAMPLES.get(flag) or (tuple(choices[1].split(",")[:2]) if choices else
                                             ("4", "8") if metavar == "INT" else ("a", "b"))
    return found


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_repeated_list_flag_appends_like_the_one_flag_form(name, capsys, monkeypatch):
    flags = _list_flags_in_help(name, capsys, monkeypatch)
    assert name not in ("train", "eval", "intervene", "zeroshot", "browse") or flags  # the help is read right
    for flag, (a, b) in flags.items():
        base = [*REQUIRED.get(name, []), *(["--set", "0:0=0"] if name == "intervene" and flag != "--set" else [])]
        repeated, together = _parse(name, *base, flag, a, "--device", "cpu", flag, b), _parse(name, *base, flag, a, b)
        assert repeated == dataclasses.replace(together, runtime=dataclasses.replace(together.runtime, device="cpu")), flag
        assert repr((a, b)) in repr(together) or repr(tuple(int(v) for v in (a, b))) in repr(together), flag


@given(st.lists(st.lists(st.sampled_from(["a", "0:1@cls=-2", "-1", "3-5"]), max_size=3), min_size=1, max_size=4),
       st.booleans())
def test_merging_repeated_flags_gives_the_one_flag_form(groups, other_first):
    other = ["--top", "3"]
    args = (other if other_first else []) + [x for g in groups for x in ["--set", *g]] + ([] if other_first else other)
    merged = ["--set", *[v for g in groups for v in g]]
    assert merge_repeated(args, {"--set"}) == ((other + merged) if other_first else (merged + other))


def test_repeated_list_flags_merge_with_equals_and_keep_other_flags():
    cfg = _parse("train", "--k=4", "--lr", "0.1", "--k", "8", "16", "--topology", "plt", "--topology", "clt")
    assert cfg.sweep.k == (4, 8, 16) and cfg.sweep.topology == ("plt", "clt") and cfg.optim.lr == 0.1


def _help_entries(name: str, capsys, monkeypatch) -> tuple[str, dict[str, str]]:
    """The --help text of a command, and each flag's help entry (its lines joined), by flag."""
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        main([name, *REQUIRED.get(name, []), "--help"])
    text, entries, current = capsys.readouterr().out, {}, None
    for line in text.splitlines():
        body = line[1:].rstrip(" │")  # without the box's borders, drawn or not
        indent = len(body) - len(body.lstrip())
        if body.strip().startswith("--") and indent <= 1:
            current = body.split()[0].rstrip(",")
            entries[current] = body.strip()
        elif current and indent > 3 and body.strip():
            entries[current] += " " + body.strip()
        else:
            current = None
    return text, entries


def _values(cfg) -> dict[str, tuple[object, str]]:
    """Every field of a config and its groups, by flag: (the value a run uses when no flag is given, its docstring)."""
    from tyro._docstrings import get_field_docstring

    out: dict[str, tuple[object, str]] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out = {**_values(value), **out}  # a group's field never hides one of the command's own
        else:
            out.setdefault("--" + f.name.replace("_", "-"), (value, get_field_docstring(type(cfg), f.name, ()) or ""))
    return out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_default_the_help_shows_is_the_one_a_run_uses(name, capsys, monkeypatch):
    import re

    text, entries = _help_entries(name, capsys, monkeypatch)
    used = _values(_parse(name, *REQUIRED.get(name, []), *(["--set", "0:0=0"] if name == "intervene" else [])))
    shown = {flag: e[e.rindex("(default: ") + len("(default: "):-1] for flag, e in entries.items() if e.endswith(")")
             and "(default: " in e}
    assert len(shown) > 10
    for flag, label in shown.items():
        value, doc = used[flag]
        assert label == (" ".join(map(str, value)) if isinstance(value, tuple) else str(value)), flag
        # A docstring that states a default in words is for a field whose shown default is unset (None, empty),
        # never one that contradicts the value shown beside it (--top-class said "the default" over False).
        if re.search(r"\bdefault: |\bthe default\b", doc):
            assert value in (None, ()), f"{flag}: {doc!r} beside (default: {label})"
    # A group's box is titled once: "evaluation options", not "options options".
    assert "options options" not in text
    if "--split" in entries:
        assert "all" in entries["--split"]
