"""The one base class of user-facing errors.

Every error that the user can fix (a bad setting, a missing or corrupt file, a mismatched
checkpoint, training that diverged) is a `VitcltError` whose message names the problem and the
fix in one line. The CLI prints exactly these as one line; anything else (a bug in vitclt, torch
or numpy) keeps its traceback. Each part of vitclt subclasses it where the reader benefits from a
narrower type (`BackboneError`, `DatasetError`, `TrainingError`, ...).
"""

from __future__ import annotations


class VitcltError(Exception):
    """A problem with the user's input or environment; the message says what is wrong and how to fix it."""


class ConfigError(VitcltError, ValueError):
    """A setting (a flag or a config field) has a value vitclt cannot use."""


class InputNotFoundError(VitcltError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class OutputError(VitcltError, OSError):
    """An output location cannot be written, or writing there would destroy something vitclt did not write."""
