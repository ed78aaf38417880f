"""The error of the backbones package: a backbone could not be loaded or was used wrongly."""

from __future__ import annotations

from vitclt.errors import VitcltError


class BackboneError(VitcltError, ValueError):
    """A backbone could not be loaded or was used wrongly; the message says how to fix it."""
