"""vitclt: cross-layer transcoders for vision transformers."""

__version__ = "0.1.0"
