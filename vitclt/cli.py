"""The `vitclt` command: one subcommand per job, each a config dataclass plus a `run` function.

The dataclass is the single source of truth: tyro builds the flags and `--help` text from its
fields and their docstrings, and the same class is what a run saves as its config.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("vitclt.demo.run", "DemoConfig"),
    "zeroshot": ("vitclt.eval.zeroshot", "ZeroShotConfig"),
    "train": ("vitclt.training", "TrainConfig"),
    "eval": ("vitclt.eval.suite", "EvalConfig"),
    "reproduce": ("vitclt.eval.reproduce", "ReproduceConfig"),
    "browse": ("vitclt.commands.browse", "BrowseConfig"),
    "explain": ("vitclt.commands.explain", "ExplainConfig"),
    "intervene": ("vitclt.commands.intervene", "InterveneConfig"),
}
"""Subcommand → (module, config class); the module's `run(cfg)` executes it."""


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and run the chosen subcommand."""
    import tyro

    modules = {name: importlib.import_module(mod) for name, (mod, _) in COMMANDS.items()}
    configs = {name: getattr(modules[name], cls) for name, (_, cls) in COMMANDS.items()}
    cfg = tyro.extras.subcommand_cli_from_dict(
        configs,
        prog="vitclt",
        args=list(argv) if argv is not None else sys.argv[1:],
        description="vitclt: cross-layer transcoders for vision transformers.",
    )
    name = next(n for n, c in configs.items() if isinstance(cfg, c))
    try:
        modules[name].run(cfg)
    except Exception as e:
        # Bad input (a missing dataset, a mismatched checkpoint, NaN in training, ...) gets its
        # message, not a traceback; anything else is a bug and keeps its traceback.
        ours = isinstance(e, (ValueError, FileNotFoundError, FileExistsError)) or type(e).__module__.startswith("vitclt.")
        if os.environ.get("VITCLT_DEBUG") or not ours:
            raise
        print(f"vitclt {name}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
