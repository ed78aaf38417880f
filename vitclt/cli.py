"""The `vitclt` command: one subcommand per job, each a config dataclass plus a `run` function.

The dataclass is the single source of truth: tyro builds the flags and `--help` text from its
fields and docstrings, and the same object is what a run saves as its config. The configs import
no torch, so `vitclt --help` is quick; a command loads what it needs when it runs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
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


def list_flags(config: type, prefix: str = "") -> set[str]:
    """The flags of `config` (a config dataclass, its groups included) that take a list of values."""
    from tyro.conf import OmitArgPrefixes, Suppress

    hints = typing.get_type_hints(config, include_extras=True)
    flags = set()
    for f in dataclasses.fields(config):
        hint, markers = hints[f.name], ()
        if typing.get_origin(hint) is Annotated:
            hint, *markers = typing.get_args(hint)
        if Suppress in markers:
            continue
        if dataclasses.is_dataclass(hint):
            flags |= list_flags(hint, prefix if OmitArgPrefixes in markers else f"{prefix}{f.name}.")
        elif any(typing.get_origin(t) in (tuple, list) for t in (hint, *typing.get_args(hint))):
            flags.add("--" + f"{prefix}{f.name}".replace("_", "-"))
    return flags


def merge_repeated(args: Sequence[str], flags: set[str]) -> list[str]:
    """`args` with every repeated list flag merged into its first occurrence: `--set A --set B` → `--set A B`.

    tyro keeps only the last occurrence of a flag, which silently dropped all but the last `--set`;
    merged, a repeated flag means what the one-flag form means, in every command.
    """
    out: list[str | list[str]] = []  # a list flag's values stay one list, which its later occurrences extend
    first: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        name, eq, inline = args[i].partition("=")
        flag = name.replace("_", "-") if name.startswith("--") else None
        i += 1
        if flag not in flags:
            out.append(args[i - 1])
            continue
        values = [inline] if eq else []
        while not eq and i < len(args) and not args[i].startswith("--") and args[i] != "-h":
            values.append(args[i])
            i += 1
        if flag in first:
            first[flag].extend(values)
        else:
            first[flag] = values
            out += [flag, values]
    return [v for a in out for v in ([a] if isinstance(a, str) else a)]


def parse(args: Sequence[str]) -> tuple[str, Any]:
    """The subcommand's name and its config, parsed from `args` (tyro exits on --help and bad flags)."""
    import tyro

    if args and args[0] in COMMANDS:
        config = COMMANDS[args[0]].config
        args = [args[0], *merge_repeated(args[1:], list_flags(config if isinstance(config, type) else type(config)))]

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
    except KeyboardInterrupt:
        # Ctrl-C: one line, no traceback. Writes are atomic (vitclt.io), so nothing is left half-written.
        if os.environ.get("VITCLT_DEBUG"):
            raise
        from vitclt.io import written

        kept = "earlier output kept (every file written before it is complete)" if written() else "nothing written"
        print(f"\nvitclt {name}: interrupted; {kept}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
