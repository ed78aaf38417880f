"""What one training step asks of the host: device operations, host reads and host-to-device copies.

On a GPU the paper-shape step was launch-bound (issue 12: 3,547 kernel launches, 139 ms of host
time against 76 ms of kernels), and every value read back to the host (``bool(t)``, ``.item()``,
``bincount``, ``nonzero``) or copied from Python data to the device stalls the host until the
device has drained its queue, so the host can no longer run ahead of it. This counts, for one
training step (forward with AuxK's dead mask, backward, fused Adam) of each sparsifier and
topology, the operations the step dispatches as torch sees them, on the CPU, with the sparse
decode and the encoder's sparse backward on their CUDA path (the fused Triton kernels' launches
are counted, not run):

* ``ops``: aten operations that compute (views, detach and aliasing ops excluded): an upper
  bound on the CUDA kernels the step launches, plus the Triton launches;
* ``host reads``: operations that wait for the device on CUDA (``_local_scalar_dense``, i.e.
  ``bool``/``item``/``int`` of a device tensor, ``tolist``, and ``nonzero``, ``bincount``,
  ``unique``, ``masked_select``, ``repeat_interleave``, which size their output from the data);
* ``H2D copies``: tensors made from Python values (``torch.tensor``, indexing with a list,
  assigning a Python scalar into a tensor), each a synchronous copy from pageable memory on CUDA.

Counts do not depend on the sizes (only on the number of layers), so a small shape with the
paper's 12 layers stands for the paper's. It runs in seconds on a CPU:

    python bench/step_launches.py
    python bench/step_launches.py --sparsifier relu-topk --topology clt --list 20
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vitclt.nn import Transcoder, TranscoderConfig, kernels, transcoder

HOST_READS = {"_local_scalar_dense", "nonzero", "bincount", "unique", "_unique2", "masked_select",
              "repeat_interleave"}
"""Operations that read device data on the host before they can return (a device sync on CUDA)."""
NOT_COMPUTE = {"detach", "lift_fresh", "set_", "alias", "_to_copy_meta"}
"""Operations that only relabel storage."""


class StepCounter(TorchDispatchMode):
    """Counts the aten operations dispatched inside it by name, and the tensors read into Python lists.

    ``Tensor.tolist`` of a CPU tensor dispatches nothing, but of a CUDA tensor it is a copy to the
    host that waits for the device: it is counted as a host read.
    """

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.h2d = 0
        self.tolist = 0
        self._real_tolist = torch.Tensor.tolist

    def __enter__(self):
        real = self._real_tolist

        def tolist(tensor):
            self.tolist += 1
            return real(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._real_tolist
        return super().__exit__(*exc)

    def host_reads(self) -> int:
        """Operations that wait for the device on CUDA."""
        return self.tolist + sum(self.ops[name] for name in HOST_READS)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "lift_fresh":
            self.h2d += 1
        elif not func.is_view and name not in NOT_COMPUTE:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


class _CountedKernel:
    """Stands for a Triton kernel: counts its launches and does not run it.

    Interpreting the kernels would take minutes per step and change no count: their outputs
    (left as allocated) feed no decision about which operations run next.
    """

    def __init__(self, launches: collections.Counter, name: str):
        self.launches, self.name = launches, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches[self.name] += 1

        return launch


@contextlib.contextmanager
def cuda_decode_counted(launches: collections.Counter):
    """While inside, the transcoder's sparse ops take their CUDA path (the fused kernels), whose launches are
    counted, not run."""
    real = kernels._kernels, transcoder.sparse_decode, transcoder.gathered_linear
    kernels._kernels = lambda: tuple(_CountedKernel(launches, name)
                                     for name in ("decode_fwd", "decode_grad_values", "decode_grad_weights"))
    transcoder.sparse_decode = functools.partial(real[1], backend="triton")
    transcoder.gathered_linear = functools.partial(real[2], backend="triton")
    try:
        yield
    finally:
        kernels._kernels, transcoder.sparse_decode, transcoder.gathered_linear = real


def count_step(topology: str, sparsifier: str, n_layers: int, dead: bool) -> tuple[StepCounter, collections.Counter]:
    """Counts of the second training step (the first builds Adam's state and cached tables)."""
    torch.manual_seed(0)
    cfg = TranscoderConfig(n_layers=n_layers, d_model=16, expansion=8, k=4, sparsifier=sparsifier, topology=topology)
    model = Transcoder(cfg)
    x_NLD, y_NLD = torch.randn(64, n_layers, 16), torch.randn(64, n_layers, 16)
    model.set_normalization(*Transcoder.normalization_stats(x_NLD), *Transcoder.normalization_stats(y_NLD))
    model.init_thresholds(x_NLD, y_NLD)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    # What the trainer passes: no mask while no feature can have gone dead yet, else the mask.
    dead_LF = None
    if dead:
        dead_LF = torch.zeros(n_layers, cfg.features, dtype=torch.bool)
        dead_LF[:, : cfg.features // 2] = True
    launches: collections.Counter = collections.Counter()
    with cuda_decode_counted(launches):
        for _ in range(2):
            launches.clear()
            with StepCounter() as counter:
                out = model(x_NLD, y_NLD, dead_mask_LF=dead_LF)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    return counter, launches


def main() -> None:
    """Print the counts per model."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", nargs="+", default=["clt", "plt", "sae"], choices=["clt", "plt", "sae"])
    ap.add_argument("--sparsifier", nargs="+", default=["relu-topk", "abs-topk", "batch-topk", "jumprelu"],
                    choices=["relu-topk", "abs-topk", "batch-topk", "jumprelu"])
    ap.add_argument("--layers", type=int, default=12, help="number of layers (the counts scale with it)")
    ap.add_argument("--list", type=int, default=0, help="also list the most frequent operations of each step")
    args = ap.parse_args()
    print(f"one training step, {args.layers} layers, CUDA path of the sparse ops (Triton launches counted, not run)")
    print(f"{'model':>16} {'dead':>5} {'ops':>5} {'triton':>6} {'host reads':>10} {'H2D copies':>10}")
    for topology in args.topology:
        for sparsifier in args.sparsifier:
            for dead in (False, True):
                counter, launches = count_step(topology, sparsifier, args.layers, dead)
                reads = counter.host_reads()
                print(f"{topology + ':' + sparsifier:>16} {'yes' if dead else 'no':>5} {sum(counter.ops.values()):>5} "
                      f"{sum(launches.values()):>6} {reads:>10} {counter.h2d:>10}", flush=True)
                if args.list:
                    for name, count in counter.ops.most_common(args.list):
                        print(f"{'':>18}{count:>5} {name}{'   <- host read' if name in HOST_READS else ''}")
    print("ops: aten operations that compute (an upper bound on CUDA kernel launches besides Triton's); host reads: "
          "operations that wait for the device on CUDA; H2D copies: tensors made from Python values. "
          "dead: no = no dead mask (the trainer's case while no feature can have gone dead), yes = half the features "
          "marked dead, so AuxK runs.")


if __name__ == "__main__":
    main()
