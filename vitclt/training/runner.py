"""`train(cfg)`: a whole run, from the backbone and dataset to checkpoints and a per-layer summary."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vitclt.data.stream import ActivationStream, BackboneSource, NormStats, RowSource, estimate_normalization, image_order
from vitclt.io import remove_stale_temporaries, write_json
from vitclt.nn import Transcoder, TranscoderConfig
from vitclt.runtime import check_writable_dir, setup
from vitclt.training import checkpoint as ckpt
from vitclt.training import distributed
from vitclt.training.config import TrainConfig, TrainingError, transcoder_configs
from vitclt.training.trainer import StepMetrics, Trainer


def _dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def build_source(cfg: TrainConfig, device: torch.device) -> RowSource:
    """The rows a run trains on: the backbone over the dataset, or the disk cache of them."""
    from vitclt.backbones import load_backbone
    from vitclt.data.datasets import load_dataset

    backbone = load_backbone(cfg.backbone, device=device, dtype=_dtype(cfg, device))
    rt = cfg.runtime
    dataset = load_dataset(cfg.dataset, cfg.split, max_images=cfg.max_images, seed=rt.seed)
    if getattr(dataset, "split_note", ""):
        print(f"note: {dataset.split_note}")
    source = BackboneSource(backbone, dataset, cfg.tokens, rt.images_per_forward, workers=rt.workers,
                            fast_decode=rt.fast_decode)
    if cfg.stream.cache_dir is None:
        return source
    from vitclt.data.cache import cache_key, open_or_build_cache

    dataset_id = f"{cfg.dataset}|split={cfg.split}|max_images={cfg.max_images}|seed={rt.seed if cfg.max_images else None}"
    key = cache_key(source, cfg.backbone, dataset_id, cfg.stream.cache_dtype)
    try:
        return open_or_build_cache(source, key, cfg.stream.cache_dir, progress=rt.progress)
    finally:
        source.close()  # the cache serves the rows from now on: its image workers are done


def _summary_writer():
    """TensorBoard's SummaryWriter class, imported only when --tensorboard asks for it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainingError("--tensorboard needs the tensorboard package: pip install tensorboard "
                            "(or pip install 'vitclt[tensorboard]'), or drop --tensorboard") from None
    return SummaryWriter


class _TensorBoard:
    """One SummaryWriter per transcoder under OUT/tb/<name>."""

    def __init__(self, out: Path, names: list[str]):
        writer = _summary_writer()
        self.writers = {name: writer(str(out / "tb" / name)) for name in names}

    def log(self, step: int, windows: dict[str, StepMetrics], lrs: dict[str, float], tokens_per_s: float) -> None:
        for name, w in windows.items():
            wr = self.writers[name]
            for tag, value in (("loss", w.loss), ("fvu", w.fvu), ("l0", w.l0), ("dead_frac", w.dead), ("lr", lrs[name]),
                               ("tokens_per_s", tokens_per_s)):
                wr.add_scalar(f"train/{tag}", value, step)
            for layer, (f, l0, d) in enumerate(zip(w.fvu_L, w.l0_L, w.dead_L)):
                wr.add_scalar(f"fvu/layer_{layer:02d}", f, step)
                wr.add_scalar(f"l0/layer_{layer:02d}", l0, step)
                wr.add_scalar(f"dead_frac/layer_{layer:02d}", d, step)

    def close(self) -> None:
        for wr in self.writers.values():
            wr.close()


def _make_models(tcfgs: dict[str, TranscoderConfig], stats: NormStats, seed: int, device: torch.device) -> dict[str, Transcoder]:
    models = {}
    for name, tcfg in tcfgs.items():
        # Same seed for each: transcoders of a sweep that share shapes start from the same weights.
        torch.manual_seed(seed)
        model = Transcoder(tcfg, device=device)
        model.set_normalization(*(t.to(device) for t in (stats.x_mean_LD, stats.x_scale_L, stats.y_mean_LD, stats.y_scale_L)))
        models[name] = model
    return models


def _first_rows(source: RowSource, n_rows: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """x_NLD, y_NLD of the run's first images (about `n_rows` rows, at least 2 images)."""
    images = image_order(source.n_images, seed, 0)[: max(2, math.ceil(n_rows / source.rows_per_image))]
    x_NLD, y_NLD = source.load(images)
    return x_NLD.to(device), y_NLD.to(device)


def _init_thresholds(models: dict[str, Transcoder], source: RowSource, n_rows: int, seed: int, device: torch.device) -> None:
    """JumpReLU models start near k active features per row: thresholds from the rows of the run's first images."""
    if any(m.cfg.sparsifier == "jumprelu" for m in models.values()):
        x_NLD, y_NLD = _first_rows(source, n_rows, seed, device)
        for model in models.values():
            model.init_thresholds(x_NLD, y_NLD)


def _match_l0(trainer: Trainer, source: RowSource, n_rows: int, seed: int, device: torch.device, lead: bool = True) -> None:
    """End of a run steered to L0 = k: trim each such JumpReLU's last L0 error on the rows its thresholds started from."""
    names = list(trainer.sparsity) if trainer.cfg.optim.sparsity_control == "target-l0" else []
    if not names:
        return
    x_NLD, y_NLD = _first_rows(source, n_rows, seed, device)
    for name in names:
        model = trainer.models[name].eval()
        factors = model.match_l0(x_NLD, y_NLD)
        model.train()
        if lead:
            print(f"{name}: thresholds scaled by {', '.join(f'{f:.3f}' for f in factors)} (per layer) so that L0 = "
                  f"{', '.join(map(str, model.cfg.k_layers))} on {x_NLD.shape[0]} training rows")


def _save(out: Path, cfg: TrainConfig, trainer: Trainer, stream: ActivationStream, stats: NormStats,
          tcfgs: dict[str, TranscoderConfig], last: dict[str, StepMetrics], finished: bool, elapsed: float,
          command: str, lead: bool = True) -> None:
    """A checkpoint: user-facing transcoder dirs first, then the training state in one atomic file.

    Every rank of a distributed run calls it (the one-process state is gathered); only the ``lead`` writes.
    """
    models = trainer.full_models()
    tensors = {**trainer.state_tensors(), **{f"norm.{k}": v for k, v in stats.tensors().items()}, **ckpt.rng_tensors()}
    if not lead:
        return
    for name, model in models.items():
        model.save_pretrained(out / name)
        w = last.get(name)
        write_json(out / name / ckpt.TRAINING_FILE, {
            "step": trainer.step, "finished": finished, "tokens": trainer.step * cfg.optim.batch_size,
            "elapsed_s": elapsed, "train_config": cfg.to_json(),
            "cost": {"update_s": trainer.model_s[name], "state_bytes": trainer.state_bytes(name)},
            "metrics": None if w is None else {"window_steps": w.steps, "loss": w.loss, "fvu": w.fvu, "l0": w.l0,
                                               "dead_frac": w.dead, "fvu_L": w.fvu_L, "l0_L": w.l0_L, "dead_frac_L": w.dead_L},
        })
    meta = {"command": command, "step": trainer.step, "finished": finished, "stream": stream.state_dict(), "elapsed_s": elapsed,
            "model_s": trainer.model_s,
            "train_config": cfg.to_json(), "transcoders": {n: dataclasses.asdict(c) for n, c in tcfgs.items()}}
    ckpt.save_state(out, tensors, meta)


def _check_backbone(meta: dict, tcfgs: dict[str, TranscoderConfig], n_layers: int, d_model: int, out: Path) -> None:
    for name, saved in meta["transcoders"].items():
        if (saved["n_layers"], saved["d_model"]) != (n_layers, d_model):
            raise TrainingError(
                f"the run in {out} trained {name!r} on a backbone with {saved['n_layers']} layers × width {saved['d_model']}, "
                f"but {saved['backbone']!r} now has {n_layers} layers × width {d_model}: resume with the original backbone, "
                "or start a new run (--overwrite or another --out)")
        before = saved.get("backbone_fingerprint", "")
        now = tcfgs[name].backbone_fingerprint if name in tcfgs else ""
        if before and now and before != now:
            raise TrainingError(
                f"the run in {out} trained {name!r} on backbone weights with fingerprint {before}, but {saved['backbone']!r} "
                f"now has fingerprint {now}: resume with the original weights, or start a new run (--overwrite or another --out)")
    if sorted(meta["transcoders"]) != sorted(tcfgs):
        raise TrainingError(f"the run in {out} trains {sorted(meta['transcoders'])}, this command asks for {sorted(tcfgs)}")


def format_summary(name: str, w: StepMetrics, path: Path) -> str:
    """A per-layer table of FVU, L0 and dead % for one transcoder, and where it is saved."""
    lines = [f"{name}: {path}", "  layer      FVU       L0   dead %"]
    for layer, (f, l0, d) in enumerate(zip(w.fvu_L, w.l0_L, w.dead_L)):
        lines.append(f"  {layer:5d} {f:8.4f} {l0:8.1f} {100 * d:8.2f}")
    lines.append(f"  {'mean':>5} {w.fvu:8.4f} {w.l0:8.1f} {100 * w.dead:8.2f}")
    return "\n".join(lines)


def format_cost(trainer: Trainer, elapsed: float, device: torch.device) -> str:
    """Each model's training cost (update time, training-state memory) and how a sweep's time grows with its models."""
    lines = ["training cost per model (update time; weights + gradients + Adam moments):"]
    for name in trainer.models:
        lines.append(f"  {name:<24} {trainer.model_s[name]:8.1f} s {trainer.state_bytes(name) / 2**20:9.1f} MiB")
    models_s = sum(trainer.model_s.values())
    shared = max(elapsed - models_s, 0.0)
    mean = models_s / len(trainer.models)
    if device.type == "cuda":
        peak = f"peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    else:
        import resource

        peak = f"peak process memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    lines.append(f"  the run took {elapsed:.1f} s: {models_s:.1f} s model updates, {shared:.1f} s shared by all models "
                 f"(activations, backbone, checkpoints); {peak}. At these settings a sweep of M models takes about "
                 f"{shared:.0f} + M × {mean:.1f} s")
    return "\n".join(lines)


def check_batch(batch_size: int, source: RowSource) -> None:
    """Refuse a batch larger than one pass over the data: every row would repeat within a step."""
    rows = source.n_images * source.rows_per_image
    if batch_size > rows:
        raise TrainingError(f"--batch-size {batch_size} is more than the {rows} token rows of one pass over the "
                            f"{source.n_images} images, so a step would repeat rows: lower --batch-size to {rows} or "
                            "fewer, or train on more images (--max-images, --dataset)")


DIVERGED_FVU = 2.0
"""End-of-training FVU above which the run surely diverged: an untrained transcoder is near 1 (measured 1.0-1.4)."""


def warn_if_worse_than_mean(last: dict[str, StepMetrics], trainer: Trainer) -> None:
    """Warn (on stderr) about every transcoder that ends worse than predicting the mean (FVU above 1), with the likely cause."""
    for name, w in last.items():
        if not w.fvu > 1:
            continue
        lr = f"the learning rate ({trainer.base_lr[name]:.3g}) is too high: retrain with a lower --lr (or the default)"
        if w.fvu > DIVERGED_FVU:
            cause = f"training diverged; most likely {lr}"
        else:
            cause = f"either the {trainer.step} steps were too few to learn (raise --steps) or {lr}"
        print(f"warning: {name} ends training with FVU {w.fvu:.3g}, worse than predicting the mean (FVU 1): {cause}",
              file=sys.stderr)


def train(cfg: TrainConfig, source: RowSource | None = None, command: str = "train") -> list[Path]:
    """Train the transcoders `cfg` describes and return their checkpoint directories.

    `source` replaces the backbone-over-dataset rows (e.g. a `CacheSource` or custom activations;
    `cfg.backbone` and `cfg.dataset` are then only recorded); by default the rows come from
    `cfg.backbone` over `cfg.dataset`, through `cfg.stream.cache_dir` if set. `command` is recorded
    in the run directory as what made it: a run only overwrites or resumes runs of its own command.
    However the run ends (finished, an error, Ctrl-C), the source's background work (image workers,
    prefetch) is stopped and joined: its ``close()``, if it has one, is called.
    """
    cfg.validate()
    device = setup(cfg.runtime)
    # Under torchrun: rank 0 checks and writes the run directory and shows progress; every rank trains.
    grid, device = distributed.start(cfg, device)
    lead = distributed.rank() == 0
    if not lead:
        cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, progress=False))
    opt = cfg.optim
    out = Path(cfg.out)
    meta, error = None, None
    if lead:
        try:
            check_writable_dir(out)
            meta = ckpt.prepare_run_dir(cfg, command)
            remove_stale_temporaries(out)  # a kill mid-write leaves one; its writer is gone, so nothing needs it
        except Exception as err:  # noqa: BLE001 (re-raised by agree, after the other ranks have heard of it)
            error = err
    distributed.agree(error)
    if not lead and cfg.resume:
        meta = ckpt.read_state_meta(out)
    if meta is not None and meta["finished"] and meta["step"] >= opt.steps:
        paths = [out / name for name in meta["transcoders"]]
        if lead:
            print(f"the run in {out} already finished {meta['step']} steps; checkpoints: " + ", ".join(map(str, paths)))
        distributed.finish()
        return paths
    if cfg.tensorboard and lead:
        _summary_writer()  # fail before any work if tensorboard is missing
    if source is None:
        # Rank 0 first: it alone builds a disk cache; the others then open it.
        error = None
        if lead:
            try:
                source = build_source(cfg, device)
            except Exception as err:  # noqa: BLE001 (re-raised by agree)
                error = err
        distributed.agree(error)
        source = source if lead else build_source(cfg, device)
        source = distributed.split_harvest(source, grid, device)
    try:
        return _run(cfg, source, device, grid, meta, command)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def _run(cfg: TrainConfig, source: RowSource, device: torch.device, grid, meta: dict | None, command: str) -> list[Path]:
    """The body of `train` once the run directory is checked and the rows' source is made."""
    rt, opt = cfg.runtime, cfg.optim
    out = Path(cfg.out)
    lead = distributed.rank() == 0
    check_batch(opt.batch_size, source)
    tcfgs = transcoder_configs(cfg, source.n_layers, source.d_model,
                               fingerprint=getattr(source, "backbone_fingerprint", ""))
    state = None
    if meta is not None:
        _check_backbone(meta, tcfgs, source.n_layers, source.d_model, out)
        # Sharded: read the one-process state into host memory; each rank moves only its slice to the device.
        state = ckpt.load_state_tensors(out, device if grid.size == 1 else "cpu")
        stats = NormStats.from_tensors({k[len("norm."):]: v for k, v in state.items() if k.startswith("norm.")})
    else:
        stats = estimate_normalization(source, cfg.stream.norm_tokens, rt.seed, progress=rt.progress)
    models = _make_models(tcfgs, stats, rt.seed, device)
    if state is None:
        # Before sharding: a sharded run starts from the slices of the one-process initialisation.
        _init_thresholds(models, source, min(cfg.stream.norm_tokens, 8192), rt.seed, device)
    trainer = distributed.make_trainer(cfg, models, device, grid)
    stream = ActivationStream(source, opt.batch_size, cfg.stream.buffer_size, rt.seed, device)
    elapsed = 0.0
    if state is not None:
        trainer.load_state_tensors(state, meta["step"])
        stream.load_state_dict(meta["stream"])
        ckpt.restore_rng(state)
        elapsed = meta["elapsed_s"]
        trainer.model_s.update(meta.get("model_s", {}))
        del state
    elif lead:
        ckpt.write_run_file(out, cfg, {n: dataclasses.asdict(c) for n, c in tcfgs.items()}, command)
    tb = _TensorBoard(out, list(models)) if cfg.tensorboard and lead else None
    last: dict[str, StepMetrics] = {}
    bar = tqdm(total=opt.steps, initial=trainer.step, desc="train", unit="step", disable=not rt.progress)
    t0, tokens0 = time.perf_counter(), trainer.step * opt.batch_size
    try:
        while trainer.step < opt.steps:
            trainer.train_step(stream.next_batch())
            bar.update(1)
            step = trainer.step
            at_checkpoint = step % cfg.checkpoint_every == 0 or step == opt.steps
            if step % cfg.log_every == 0 or at_checkpoint:
                trainer.check_finite()
                last = trainer.window()
                now = time.perf_counter()
                rate = (step * opt.batch_size - tokens0) / max(now - t0, 1e-9)
                bar.set_postfix_str(" | ".join(f"{n} loss {w.loss:.3f} fvu {w.fvu:.3f} l0 {w.l0:.1f} dead {100 * w.dead:.1f}%"
                                               for n, w in last.items()) + f" | {rate:,.0f} tok/s")
                if tb is not None:
                    tb.log(step, last, {n: trainer.lr(n) for n in models}, rate)
            if step == opt.steps:
                _match_l0(trainer, source, min(cfg.stream.norm_tokens, 8192), rt.seed, device, lead)
            if at_checkpoint:
                now = time.perf_counter()
                _save(out, cfg, trainer, stream, stats, tcfgs, last, step == opt.steps, elapsed + now - t0, command, lead)
    finally:
        bar.close()
        if tb is not None:
            tb.close()
    paths = [out / name for name in models]
    distributed.finish()
    if not lead:
        return paths
    for name, path in zip(models, paths):
        print(format_summary(name, last[name], path))
    print(format_cost(trainer, elapsed + time.perf_counter() - t0, device))
    warn_if_worse_than_mean(last, trainer)
    remove_stale_temporaries(out)
    return paths
