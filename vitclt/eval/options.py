"""`EvalOptions`: what the evaluation suite measures, shared by `vitclt eval` and `vitclt reproduce`.

Torch-free, so the command-line configs that nest it stay cheap to import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from vitclt.errors import ConfigError
from vitclt.nn.config import TokenSet


@dataclass
class EvalOptions:
    """The evaluation suite's settings: replacement windows and tokens, faithfulness, retrieval."""

    windows: tuple[str, ...] = ()
    """Replacement windows: START-END, a layer N, all, or last:N (e.g. 0-11 3-11 last:2); default: the paper's, scaled."""
    replace_tokens: tuple[TokenSet, ...] = get_args(TokenSet)
    """Token subsets whose MLP outputs each window's cascaded replacement replaces."""
    faith_tokens: tuple[TokenSet, ...] = ("all", "cls")
    """Token subsets whose last-layer reconstruction the faithfulness edits replace."""
    top_k: int | None = None
    """Sources kept for sufficiency; default: L/3 rounded (4 for 12 layers)."""
    seeds: int = 5
    """Seeds for the faithfulness random-source controls."""
    retrieval_pool: Literal["cls", "patches"] = "cls"
    """Retrieval vector: the CLS token's code, or the mean of the patch tokens' codes."""
    retrieval_k: int = 5
    """Neighbours counted by label precision@k."""
    retrieval_queries: int = 1
    """Query images shown in the retrieval figure (one figure each per CLT)."""
    retrieval_neighbours: int = 3
    """Neighbours shown per query and layer."""

    def validate(self) -> None:
        """Raise `ConfigError` naming the first setting out of range."""
        if not self.replace_tokens or not self.faith_tokens:
            raise ConfigError("--replace-tokens and --faith-tokens need at least one of cls, patches, all")
        for name in ("replace_tokens", "faith_tokens"):
            values = list(getattr(self, name))
            if len(set(values)) != len(values):
                raise ConfigError(f"--{name.replace('_', '-')} lists a value twice: {values}")
        for name in ("seeds", "retrieval_k", "retrieval_neighbours"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.retrieval_queries < 0:
            raise ConfigError(f"--retrieval-queries cannot be negative, got {self.retrieval_queries}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top-k must be at least 1, got {self.top_k}")
