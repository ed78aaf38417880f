"""`EvalOptions`: what the evaluation suite measures, shared by `vitclt eval` and `vitclt reproduce`;
`HeadOptions`: the task head that scores accuracy, nested in it and in `vitclt zeroshot`.

Torch-free, so the command-line configs that nest them stay cheap to import.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Annotated, Literal, get_args

from tyro.conf import OmitArgPrefixes

from vitclt.errors import ConfigError
from vitclt.nn.config import TokenSet

HeadKind = Literal["auto", "zeroshot", "probe", "own"]
"""How the task head is made (`vitclt.backbones.heads.HEAD_KINDS`)."""

DEFAULT_REPLACE_TOKENS: tuple[TokenSet, ...] = get_args(TokenSet)
"""Replaced token subsets when --replace-tokens is not given (without cls on a model that has no CLS token)."""
DEFAULT_FAITH_TOKENS: tuple[TokenSet, ...] = ("all", "cls")
"""Faithfulness token subsets when --faith-tokens is not given (likewise)."""


@dataclass
class HeadOptions:
    """The task head that turns image embeddings into class scores, built once from the clean model."""

    head: HeadKind = "auto"
    """auto: zero-shot with a text tower, else the checkpoint's own classifier, else a linear probe; or force one."""
    probe_split: str = "train"
    """Split a linear probe is fitted on (never the evaluated one); used only when the head is a probe."""
    probe_images: int | None = None
    """Fit the probe on a class-stratified subset of this many images of --probe-split (default: all of it)."""

    def validate(self) -> None:
        """Raise `ConfigError` naming the first setting out of range."""
        if self.probe_images is not None and self.probe_images < 1:
            raise ConfigError(f"--probe-images must be at least 1, got {self.probe_images}")


@dataclass
class EvalOptions:
    """The evaluation suite's settings: task head, replacement windows and tokens, faithfulness, retrieval."""

    task: Annotated[HeadOptions, OmitArgPrefixes] = field(default_factory=HeadOptions)
    """The task head accuracies are measured with."""
    windows: tuple[str, ...] = ()
    """Replacement windows: START-END, a layer N, all, or last:N (e.g. 0-11 3-11 last:2); default: the paper's, scaled."""
    replace_tokens: tuple[TokenSet, ...] | None = None
    """Token subsets each window's cascaded replacement replaces; default: cls patches all (no cls without a CLS token)."""
    faith_tokens: tuple[TokenSet, ...] | None = None
    """Token subsets whose last-layer reconstruction the faithfulness edits replace; default: all cls (no cls without one)."""
    top_k: int | None = None
    """Sources kept for sufficiency; default: L/3 rounded (4 for 12 layers)."""
    seeds: int = 5
    """Seeds for the faithfulness random-source controls."""
    retrieval_pool: Literal["cls", "patches"] | None = None
    """Retrieval vector: the CLS token's code, or the mean of the patch tokens' codes; default: cls (without one: patches)."""
    retrieval_k: int = 5
    """Neighbours counted by label precision@k."""
    retrieval_queries: int = 1
    """Query images shown in the retrieval figure (one figure each per CLT)."""
    retrieval_neighbours: int = 3
    """Neighbours shown per query and layer."""

    def validate(self) -> None:
        """Raise `ConfigError` naming the first setting out of range."""
        from vitclt.eval.windows import check_windows

        self.task.validate()
        check_windows(self.windows, "--windows")
        for name in ("replace_tokens", "faith_tokens"):
            values = getattr(self, name)
            if values is None:
                continue
            if not values:
                raise ConfigError(f"--{name.replace('_', '-')} needs at least one of cls, patches, all")
            if len(set(values)) != len(values):
                raise ConfigError(f"--{name.replace('_', '-')} lists a value twice: {list(values)}")
        for name in ("seeds", "retrieval_k", "retrieval_neighbours"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.retrieval_queries < 0:
            raise ConfigError(f"--retrieval-queries cannot be negative, got {self.retrieval_queries}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top-k must be at least 1, got {self.top_k}")

    def for_backbone(self, has_cls_token: bool, model: str = "this model") -> tuple[EvalOptions, str]:
        """These options with every default token choice filled in for a backbone, and a note if a default adapted.

        On a model without a CLS token (SigLIP pools its patch tokens) the defaults leave `cls` out and
        retrieval pools the patch tokens, said in one line; a `cls` the user asked for is an error
        naming the flag.
        """
        self.validate()
        if has_cls_token:
            return replace(self, replace_tokens=self.replace_tokens or DEFAULT_REPLACE_TOKENS,
                           faith_tokens=self.faith_tokens or DEFAULT_FAITH_TOKENS,
                           retrieval_pool=self.retrieval_pool or "cls"), ""
        for flag, asked in (("--replace-tokens", self.replace_tokens), ("--faith-tokens", self.faith_tokens),
                            ("--retrieval-pool", (self.retrieval_pool,))):
            if asked and "cls" in asked:
                raise ConfigError(f"{flag} cls: {model} has no CLS token (it pools its patch tokens); use patches or all")
        resolved = {}
        for name, default in (("replace_tokens", DEFAULT_REPLACE_TOKENS), ("faith_tokens", DEFAULT_FAITH_TOKENS)):
            if getattr(self, name) is None:
                resolved[name] = tuple(t for t in default if t != "cls")
        if self.retrieval_pool is None:
            resolved["retrieval_pool"] = "patches"
        flags = {"replace_tokens": "--replace-tokens", "faith_tokens": "--faith-tokens", "retrieval_pool": "--retrieval-pool"}
        note = (f"{model} has no CLS token, so the defaults leave cls out: "
                + ", ".join(f"{flags[k]} {v if isinstance(v, str) else ' '.join(v)}" for k, v in resolved.items())
                ) if resolved else ""
        return replace(self, **resolved), note
