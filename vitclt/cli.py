"""The `vitclt` command: one subcommand per job, each a config dataclass plus a `run` function.

The dataclass is the single source of truth: tyro builds the flags and `--help` text from its
fields and docstrings, and the same object is what a run saves as its config. The configs import
no torch, so `vitclt --help` is quick; a command loads what it needs when it runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any, NamedTuple, Union

from vitclt.commands import browse, demo, explain, intervene, plan, push, reproduce, train, zeroshot
from vitclt.commands import eval as eval_command
from vitclt.errors import VitcltError


class Command(NamedTuple):
    """A subcommand: its config (a dataclass, or a preset instance of one), what runs it, its help line."""

    config: Any
    run: Callable[[Any], Any]
    description: str | None = None


COMMANDS: dict[str, Command] = {
    "demo": Command(demo.DEMO, reproduce.run, demo.DESCRIPTION),
    "zeroshot": Command(zeroshot.ZeroShotConfig, zeroshot.run),
    "train": Command(train.TrainConfig, train.run),
    "eval": Command(eval_command.EvalConfig, eval_command.run),
    "reproduce": Command(reproduce.ReproduceConfig, reproduce.run),
    "browse": Command(browse.BrowseConfig, browse.run),
    "explain": Command(explain.ExplainConfig, explain.run),
    "intervene": Command(intervene.InterveneConfig, intervene.run),
    "push": Command(push.PushConfig, push.run),
    "plan": Command(plan.PlanConfig, plan.run),
}
"""Subcommand name → its config and runner."""


def version() -> str:
    """The installed vitclt version (the package's own if it is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("vitclt")
    except PackageNotFoundError:
        from vitclt import __version__

        return __version__


def parse(args: Sequence[str]) -> tuple[str, Any]:
    """The subcommand's name and its config, parsed from `args` (tyro exits on --help and bad flags)."""
    import tyro

    options = []
    for name, cmd in COMMANDS.items():
        if isinstance(cmd.config, type):
            marker = tyro.conf.subcommand(name, description=cmd.description)
            options.append(Annotated[cmd.config, marker])
        else:
            marker = tyro.conf.subcommand(name, default=cmd.config, description=cmd.description)
            options.append(Annotated[type(cmd.config), marker])
    cfg = tyro.cli(Union[tuple(options)], args=list(args), prog="vitclt",  # type: ignore[arg-type]
                   description="vitclt: cross-layer transcoders for vision transformers (--version prints the version).")
    classes = {n: c.config for n, c in COMMANDS.items() if isinstance(c.config, type)}
    name = getattr(cfg, "command", None) or next(n for n, cls in classes.items() if isinstance(cfg, cls))
    return name, cfg


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and run the chosen subcommand."""
    args = list(argv) if argv is not None else sys.argv[1:]
    if args[:1] == ["--version"]:
        print(f"vitclt {version()}")
        return
    name, cfg = parse(args)
    try:
        COMMANDS[name].run(cfg)
    except VitcltError as e:
        # Bad input (a missing dataset, a mismatched checkpoint, training that diverged, ...) gets its
        # one-line message; anything else is a bug and keeps its traceback.
        if os.environ.get("VITCLT_DEBUG"):
            raise
        print(f"vitclt {name}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
