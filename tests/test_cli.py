"""The command line: composed configs with flat flags, one meaning per flag, --version, quiet progress, fast --help."""

import os
import subprocess
import sys

import pytest

import vitclt
from vitclt.cli import COMMANDS, main, parse
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
