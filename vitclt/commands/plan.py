"""`vitclt plan`: memory per rank and bytes per step of `torchrun ... train --feature-shards S`, for every S."""

from __future__ import annotations

from dataclasses import dataclass

from vitclt.errors import ConfigError
from vitclt.nn.config import SparsifierName, Topology

SHAPES = {"vit-b/32": (12, 768), "vit-b/16": (12, 768), "vit-l/14": (24, 1024), "vit-h/14": (32, 1280)}
"""(layers, width) of common backbones."""


@dataclass
class PlanConfig:
    """What to plan: a backbone's shapes, the transcoder, the batch, the processes and the GPU memory."""

    backbone: str = "vit-l/14"
    """Shapes of one of: vit-b/32, vit-b/16, vit-l/14, vit-h/14 (or give --n-layers and --d-model)."""
    n_layers: int = 0
    """Transformer blocks (0: the backbone's)."""
    d_model: int = 0
    """Width (0: the backbone's)."""
    n_features: int = 32768
    """Features per layer."""
    topology: Topology = "clt"
    """clt, plt or sae."""
    sparsifier: SparsifierName = "relu-topk"
    """The sparsifier (decides what is communicated)."""
    k: int = 32
    """Active features per row and layer."""
    batch_size: int = 4096
    """Global batch (rows per step), split over the replicas."""
    buffer_size: int = 2**17
    """Rows of the activation buffer every rank holds."""
    buffer_bytes: int = 2
    """Bytes per buffered value (2: bfloat16 on CUDA, 4: float32)."""
    processes: int = 8
    """N: processes (GPUs) of the run."""
    gpu_gib: float = 80.0
    """Memory of one GPU, in GiB."""

    def shape(self):
        """The `Shape` to plan for."""
        from vitclt.training.plan import Shape

        if self.backbone not in SHAPES and not (self.n_layers and self.d_model):
            raise ConfigError(f"unknown --backbone {self.backbone!r}: choose one of {', '.join(SHAPES)}, "
                              "or give --n-layers and --d-model")
        L, D = SHAPES.get(self.backbone, (0, 0))
        return Shape(self.n_layers or L, self.d_model or D, self.n_features, self.topology, self.sparsifier, self.k,
                     self.batch_size, self.buffer_size, self.buffer_bytes)


def run(cfg: PlanConfig) -> str:
    """Print the plan of every feature-shard count that divides --processes."""
    from vitclt.training.plan import format_plans

    if cfg.processes < 1:
        raise ConfigError(f"--processes must be at least 1, got {cfg.processes}")
    text = format_plans(cfg.shape(), cfg.processes, cfg.gpu_gib)
    print(text)
    return text
