"""Memory per rank and bytes communicated per step of a sharded run, from the shapes alone (no torch).

Counts follow what `vitclt.nn.sharded` and `vitclt.training.distributed` allocate and send, in float32:
parameters, their gradients and Adam's two moments per rank; the step's largest activations; the activation
buffer (every rank holds the stream's whole buffer); and per step, the all-reduce of the partial
reconstructions and the gathers of TopK candidates over the feature group, and the all-reduce of the
gradients over the replica group. An all-reduce of b bytes over g ranks sends 2·b·(g−1)/g per rank (a ring);
an all-gather of b bytes per rank sends b·(g−1).
"""

from __future__ import annotations

from dataclasses import dataclass

FLOAT = 4
"""Bytes of a float32: weights, gradients, Adam moments and the step's activations."""


@dataclass(frozen=True)
class Shape:
    """The transcoder and batch a plan is for."""

    n_layers: int
    d_model: int
    n_features: int
    topology: str = "clt"
    sparsifier: str = "relu-topk"
    k: int = 32
    batch_size: int = 4096
    buffer_rows: int = 2**17
    buffer_bytes: int = 2
    """Bytes per value of the activation buffer (bfloat16 on CUDA by default, float32 on CPU)."""


@dataclass(frozen=True)
class RankPlan:
    """Bytes on one rank of an S × R grid, and bytes it sends per step."""

    shards: int
    replicas: int
    parameters: int
    gradients: int
    adam: int
    activations: int
    buffer: int
    sent_per_step: int

    @property
    def total(self) -> int:
        """Everything a rank holds at the peak of a step."""
        return self.parameters + self.gradients + self.adam + self.activations + self.buffer


def rank_plan(shape: Shape, processes: int, shards: int) -> RankPlan:
    """The plan of one rank when ``processes`` ranks split features ``shards`` ways (the rest are replicas)."""
    if processes % shards or shape.n_features % shards or shape.batch_size % (processes // shards):
        raise ValueError(f"{shards} shards do not divide {processes} processes, {shape.n_features} features and the batch")
    L, D, S = shape.n_layers, shape.d_model, shards
    R = processes // S
    width = shape.n_features // S
    pairs = L * (L + 1) // 2 if shape.topology == "clt" else L
    thresholds = L * width if shape.sparsifier == "jumprelu" else 0
    n_params = L * width * D + L * width + pairs * width * D + L * D + thresholds
    rows = shape.batch_size // R
    # One layer's dense pre-activations and its selection's temporaries (scores, masks, a cumulative count) at a
    # time, plus normalised inputs, targets, the reconstruction and its gradient.
    k_slots = min(shape.k, width)
    activations = rows * width * (FLOAT * 2 + 8 + 3) + 4 * rows * L * D * FLOAT + rows * L * k_slots * (FLOAT + 8) * 2
    buffer = shape.buffer_rows * L * D * 2 * shape.buffer_bytes
    sent = 0
    if S > 1:
        sent += 2 * rows * L * D * FLOAT * (S - 1) // S  # partial reconstructions
        if shape.sparsifier in ("relu-topk", "abs-topk"):
            sent += rows * L * k_slots * FLOAT * (S - 1)  # TopK candidates
    if shape.sparsifier == "batch-topk" and processes > 1:
        sent += min(shape.k * shape.batch_size, rows * width) * L * FLOAT * (processes - 1)  # the batch's top values
    if R > 1:
        sent += 2 * n_params * FLOAT * (R - 1) // R  # gradients
    return RankPlan(S, R, n_params * FLOAT, n_params * FLOAT, 2 * n_params * FLOAT, activations, buffer, sent)


def plans(shape: Shape, processes: int) -> list[RankPlan]:
    """The plan of every feature-shard count that divides ``processes`` and the features."""
    return [rank_plan(shape, processes, s) for s in range(1, processes + 1)
            if processes % s == 0 and shape.n_features % s == 0 and shape.batch_size % (processes // s) == 0]


def format_plans(shape: Shape, processes: int, gpu_gib: float) -> str:
    """A table of the plans, GiB per rank and MiB sent per step, marking which fit ``gpu_gib``."""
    gib, mib = 2.0**30, 2.0**20
    lines = [f"{shape.topology}:{shape.sparsifier}, {shape.n_layers} layers x width {shape.d_model}, "
             f"{shape.n_features} features per layer, batch {shape.batch_size}, {processes} processes",
             "  S x R   params   grads    Adam  activ.  buffer   total GiB/rank   sent MiB/step  fits "
             f"{gpu_gib:g} GiB"]
    fitting = []
    for p in plans(shape, processes):
        fits = p.total / gib <= gpu_gib
        if fits:
            fitting.append(p.shards)
        lines.append(f"  {p.shards:>2} x {p.replicas:<2} {p.parameters / gib:7.2f} {p.gradients / gib:7.2f} "
                     f"{p.adam / gib:7.2f} {p.activations / gib:7.2f} {p.buffer / gib:7.2f} {p.total / gib:16.2f} "
                     f"{p.sent_per_step / mib:15.1f}  {'yes' if fits else 'no'}")
    lines.append(f"--feature-shards {min(fitting)} is the fewest that fits" if fitting else
                 f"no S fits {gpu_gib:g} GiB with {processes} processes: use more processes, fewer features or a smaller batch")
    return "\n".join(lines)
