"""A training step never waits for the device when it need not: no host reads, no copies from Python values.

On CUDA every value read back to the host (``bool``/``item``/``tolist`` of a device tensor, ``bincount``)
and every tensor built from Python data stalls the host until the device drains its queue, so the
host can no longer queue the next kernels ahead of the device. These tests count such operations on
the CPU, with the sparse ops on their CUDA path (bench/step_launches.py does the counting).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitclt.nn import Transcoder, TranscoderConfig
from vitclt.nn.kernels import csr_offsets
from vitclt.training.config import OptimConfig, TrainConfig
from vitclt.training.trainer import Trainer

pytest.importorskip("triton")  # the CUDA decode path's launch wrapper needs triton.language's dtypes

ROOT = Path(__file__).parents[1]


def _counts(*args: str) -> dict[tuple[str, str], tuple[int, ...]]:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "step_launches.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 6 and ":" in parts[0] and parts[1] in ("no", "yes"):
            rows[parts[0], parts[1]] = tuple(int(p) for p in parts[2:])
    return rows


def test_topk_training_steps_read_nothing_back_and_copy_nothing_up():
    rows = _counts("--topology", "clt", "plt", "--sparsifier", "relu-topk", "abs-topk", "batch-topk", "jumprelu")
    for (model, dead), (ops, triton, reads, h2d) in rows.items():
        auxk = dead == "yes" and not model.endswith("jumprelu")  # JumpReLU has no AuxK
        # One launch per decode kernel (AuxK's decode too), and one per layer for the encoder's weight gradient.
        assert triton == (6 if auxk else 3) + 12, (model, dead)
        assert h2d == 0, (model, dead)
        # BatchTopK and JumpReLU read their code's width once per layer; AuxK reads how many are dead once per step.
        width_reads = 12 if model.endswith(("batch-topk", "jumprelu")) else 0
        assert reads == width_reads + auxk, (model, dead)
    assert len(rows) == 16


@settings(max_examples=30, deadline=None)
@given(keys=st.lists(st.integers(0, 40), max_size=200), extra=st.integers(0, 5))
def test_csr_offsets_equal_the_running_sum_of_bincount(keys, extra):
    keys_N = torch.tensor(keys, dtype=torch.long)
    n_keys = (max(keys) + 1 if keys else 0) + extra
    expected = torch.zeros(n_keys + 1, dtype=torch.long)
    expected[1:] = torch.bincount(keys_N, minlength=n_keys).cumsum(0)
    assert torch.equal(csr_offsets(keys_N, n_keys), expected)


def _trainer(dead_tokens: int, batch: int, seed: int = 0) -> tuple[Trainer, Transcoder]:
    torch.manual_seed(seed)
    model = Transcoder(TranscoderConfig(n_layers=3, d_model=8, n_features=48, k=2, dead_tokens=dead_tokens))
    cfg = TrainConfig(optim=OptimConfig(steps=8, batch_size=batch, lr=1e-2, warmup_steps=0))
    return Trainer(cfg, {"m": model}, torch.device("cpu")), model


def _batches(n_steps: int, batch: int):
    from vitclt.data.stream import Batch

    gen = torch.Generator().manual_seed(7)
    for _ in range(n_steps):
        x, y = torch.randn(batch, 3, 8, generator=gen), torch.randn(batch, 3, 8, generator=gen)
        yield Batch(x, y, torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.long))


def test_trainer_hands_over_the_dead_mask_only_once_a_feature_can_be_dead_and_trains_the_same():
    batch = 16
    trainer, model = _trainer(dead_tokens=3 * batch, batch=batch)
    reference, reference_model = _trainer(dead_tokens=3 * batch, batch=batch)
    masks = []
    forward = model.forward

    def spy(x_NLD, y_NLD, dead_mask_LF=None):
        masks.append(dead_mask_LF)
        return forward(x_NLD, y_NLD, dead_mask_LF)

    model.forward = spy
    # The reference always hands over the mask, as every step did before the bound existed.
    reference_forward = reference_model.forward
    reference_model.forward = lambda x, y, dead_mask_LF=None: reference_forward(
        x, y, reference.since_fired["m"] >= reference_model.cfg.dead_tokens)
    for b in _batches(8, batch):
        trainer.train_step(b)
        reference.train_step(b)
    assert [m is None for m in masks] == [True] * 3 + [False] * 5
    assert any(bool(m.any()) for m in masks[3:])  # some features did go dead, and AuxK saw them
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(trainer.since_fired["m"], reference.since_fired["m"])
