"""The `vitclt` subcommands: one module each, holding the command's config dataclass and `run(cfg)`.

A config is the single source of truth for its command: tyro builds the flags and `--help` from
its fields and docstrings, and the same object is what the run saves. Configs import no torch;
`run` loads what it needs. Commands call the libraries (`vitclt.training`, `vitclt.eval`,
`vitclt.report`); nothing below imports from here.
"""
