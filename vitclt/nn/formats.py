"""A transcoder on disk: normalisation folding, vitclt's checkpoint format, circuit-tracer's format.

vitclt's format is a directory holding ``config.json`` (the `TranscoderConfig`) and
``model.safetensors`` (the state dict with the normalisation statistics folded into the weights, so
a saved transcoder maps raw activations to raw activations). ``Transcoder.save_pretrained`` and
``Transcoder.from_pretrained`` call `save_pretrained` and `read_config` / `load_weights` here.

A directory may also be named by a Hugging Face hub id (``org/repo[@revision]``, ``hf:org/repo``):
`read_config` and `load_weights` resolve it through `vitclt.nn.hub.resolve_directory` (cache,
revisions, offline mode), so ``Transcoder.from_pretrained("org/repo")`` works; local paths win.

circuit-tracer's format (`export_circuit_tracer`, read back by `load_circuit_tracer`) is one pair of
files per source layer i: ``W_enc_{i}.safetensors`` (W_enc_{i} [F, D], b_enc_{i} [F], b_dec_{i} [D],
threshold_{i} [F]) and ``W_dec_{i}.safetensors`` (W_dec_{i} [F, L−i, D], target layers i..L−1 on the
middle axis), all in raw units, plus ``vitclt_config.json`` (the exported model's `TranscoderConfig`).
A TopK sparsifier becomes a JumpReLU; with a calibration sample its thresholds are fitted per feature
(`vitclt.nn.calibrate`), else its running per-layer threshold is used.

ViT-Prisma's per-layer transcoders (`load_prisma_transcoders`) are read as a PLT; their ``.pt`` files go
through torch's restricted (``weights_only``) unpickler only. vitclt's own weights are only read with
safetensors (never unpickled).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from vitclt.errors import ConfigError, VitcltError
from vitclt.io import read_json_object, write_json, write_safetensors
from vitclt.nn.config import TranscoderConfig
from vitclt.nn.hub import resolve_directory

if TYPE_CHECKING:
    from vitclt.nn.transcoder import Transcoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(VitcltError, ValueError):
    """A transcoder directory is missing, corrupt, or does not fit its config or the backbone."""


def folded_state(model: Transcoder) -> dict[str, Tensor]:
    """The state dict with the normalisation folded into the weights (new tensors, no grad).

    Encoder: pre = ((x − μ_x)/s_x)·Wᵀ + b = x·(W/s_x)ᵀ + (b − W·μ_x/s_x), so thresholds on the
    pre-activations stay valid. Decoder: ŷ_raw = s_y·(Σ z W + b) + μ_y.
    """
    with torch.no_grad():
        state = {k: v.detach() for k, v in model.state_dict().items()}
        sx, mx = model.x_scale_L, model.x_mean_LD
        sy, my = model.y_scale_L, model.y_mean_LD
        W_enc = [W.detach() for W in model.W_enc]
        for i, W_FD in enumerate(W_enc):
            state[f"W_enc.{i}"] = W_FD / sx[i]
        state["b_enc"] = model.b_enc.detach() - torch.stack([W_FD @ mx[i] for i, W_FD in enumerate(W_enc)]) / sx[:, None]
        for i, decoders in enumerate(model.W_dec):
            for t, j in enumerate(model.targets(i)):
                state[f"W_dec.{i}.{t}"] = decoders[t].detach() * sy[j]
        state["b_dec"] = model.b_dec.detach() * sy[:, None] + my
        state["x_mean_LD"] = torch.zeros_like(mx)
        state["x_scale_L"] = torch.ones_like(sx)
        state["y_mean_LD"] = torch.zeros_like(my)
        state["y_scale_L"] = torch.ones_like(sy)
    return state


def fold_normalization(model: Transcoder) -> None:
    """Fold the statistics into W_enc, b_enc, W_dec, b_dec and reset them to identity (in place)."""
    folded = folded_state(model)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(folded[name])


def save_pretrained(model: Transcoder, directory: str | os.PathLike) -> Path:
    """Write config.json and model.safetensors (normalisation folded) atomically; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / WEIGHTS_NAME, folded_state(model), metadata={"format": "pt"})
    write_json(directory / CONFIG_NAME, dataclasses.asdict(model.cfg))
    return directory


def _check_directory(directory: Path) -> None:
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise CheckpointError(
                f"{directory} has no {name}: a transcoder directory holds {CONFIG_NAME} and "
                f"{WEIGHTS_NAME}, as written by Transcoder.save_pretrained; pass such a directory"
            )


def read_config(directory: str | os.PathLike) -> TranscoderConfig:
    """The validated `TranscoderConfig` of a transcoder directory (or hub id); `CheckpointError` naming the file if broken."""
    directory = resolve_directory(directory)
    _check_directory(directory)
    path = directory / CONFIG_NAME
    fix = "restore it from the run that wrote it, or save the transcoder again"
    raw = read_json_object(path, CheckpointError, fix, kind="transcoder config")
    try:
        cfg = TranscoderConfig.from_dict(raw)
        cfg.validate()
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except TypeError as err:  # a field of the wrong type, e.g. "n_layers": "3"
        raise CheckpointError(f"{path} has a setting of the wrong type ({err}): {fix}") from None
    return cfg


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}
"""The safetensors header's dtype names that torch tensors can have."""


def weights_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name → (shape, dtype name) of every tensor in safetensors file `path`, from its header alone (nothing is loaded)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    except (safetensors.SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}), probably empty or truncated by an interrupted "
            "copy: copy it again, or save the transcoder again"
        ) from None


def header_mismatches(header: dict[str, tuple[tuple[int, ...], str]],
                      expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> list[str]:
    """What differs between a file's tensors (`weights_header`) and the `expected` name → (shape, dtype), in words."""
    problems = [f"{k} has shape {header[k][0]}, config implies {shape}" for k, (shape, _) in expected.items()
                if k in header and header[k][0] != shape]
    problems += [f"missing {k}" for k in expected if k not in header]
    problems += [f"unexpected {k}" for k in header if k not in expected]
    for k, (_, dtype) in expected.items():
        stored = _SAFETENSORS_DTYPES.get(header[k][1]) if k in header else dtype
        # Floating weights may be stored at another precision; an integer or boolean where a float belongs may not.
        kind = (stored.is_floating_point, stored == torch.bool) if stored is not None else None
        if kind != (dtype.is_floating_point, dtype == torch.bool):
            problems.append(f"{k} is stored as {header[k][1]}, expected {str(dtype).removeprefix('torch.')}")
    return problems


def check_weights_header(directory: Path, expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
                         cfg: TranscoderConfig) -> None:
    """Refuse, in one line and before any allocation, a model.safetensors whose tensors are not the ones `cfg` implies."""
    path = directory / WEIGHTS_NAME
    problems = header_mismatches(weights_header(path), expected)
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CheckpointError(
            f"{directory / CONFIG_NAME} does not match {path} ({cfg.topology}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
            f"{cfg.features} features in the config): " + "; ".join(problems[:5]) + more
            + f": restore the {CONFIG_NAME} saved with these weights, or save the transcoder again"
        )


def load_weights(model: Transcoder, directory: str | os.PathLike, device: torch.device | str | None = None) -> None:
    """Load a directory's (or hub id's) model.safetensors into `model`, whose config must match the file's tensors."""
    path = resolve_directory(directory) / WEIGHTS_NAME
    try:
        state = safetensors.torch.load_file(path, device=str(torch.device(device or "cpu")))
    except safetensors.SafetensorError as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}), probably empty or truncated by an interrupted "
            "copy: copy it again, or save the transcoder again"
        ) from None
    _load_state(model, state, path)


def _load_state(model: Transcoder, state: dict[str, Tensor], path: Path | str) -> None:
    """Assign `state` to `model` after checking its names and shapes against the model's config."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k} has shape {tuple(state[k].shape)}, config implies {shape}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    if problems:
        cfg = model.cfg
        raise CheckpointError(
            f"{path} does not match {CONFIG_NAME} ({cfg.topology}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
            f"{cfg.features} features): " + "; ".join(problems[:10])
        )
    model.load_state_dict(state, strict=True, assign=True)


def transcoder_from_state(cfg: TranscoderConfig, state: dict[str, Tensor], source: Path | str,
                          device: torch.device | str | None = None) -> Transcoder:
    """A frozen, eval-mode `Transcoder` of `cfg` holding `state` (names and shapes checked, `CheckpointError` naming `source`)."""
    from vitclt.nn.transcoder import Transcoder

    model = Transcoder(cfg, device=device, initialize=False)
    _load_state(model, {k: v.to(device or "cpu") for k, v in state.items()}, source)
    return model.eval().requires_grad_(False)


def jumprelu_state(state: dict[str, Tensor], threshold_LF: Tensor) -> dict[str, Tensor]:
    """`state` with its sparsifier entries replaced by a JumpReLU's, thresholds `threshold_LF` (raw units)."""
    out = {k: v for k, v in state.items() if not k.startswith("sparsifier.")}
    # As Sparsifier.to_jumprelu: θ is stored as log θ, so a zero threshold becomes a tiny positive one.
    out["sparsifier.log_threshold_LF"] = threshold_LF.float().clamp_min(1e-12).log()
    return out


CIRCUIT_TRACER_CONFIG = "vitclt_config.json"
CALIBRATION_NAME = "calibration.json"


def export_circuit_tracer(model: Transcoder, directory: str | os.PathLike, calibration_x_NLD: Tensor | None = None,
                          calibration_y_NLD: Tensor | None = None) -> Path:
    """Write circuit-tracer's per-layer files (see the module docstring) into `directory`.

    W_dec_{i} has zeros where there is no decoder (off the diagonal for a PLT). circuit-tracer knows no
    TopK, so a TopK sparsifier is written as a JumpReLU: with `calibration_x_NLD` (MLP inputs, raw
    units) its thresholds are fitted per feature on that sample (`vitclt.nn.calibrate`), and the L0
    and FVU of the exported model beside the original's (on `calibration_y_NLD` when given) are
    printed and written to calibration.json; without it, the running per-layer threshold is used.
    """
    from vitclt.nn.calibrate import calibrate_jumprelu

    if model.cfg.topology == "sae":
        raise CheckpointError("circuit-tracer takes transcoders (clt or plt), not an sae: export a clt or plt")
    calibration = None
    if calibration_x_NLD is not None:
        calibration = calibrate_jumprelu(model, calibration_x_NLD, calibration_y_NLD)
        threshold_LF = calibration.threshold_LF.float().cpu()
    else:
        threshold_LF = model.sparsifier.thresholds().float().cpu()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    folded = folded_state(model)
    L, n_feat, D = model.n_layers, model.n_features, model.d_model
    for i in range(L):
        encoder = {
            f"W_enc_{i}": folded[f"W_enc.{i}"],
            f"b_enc_{i}": folded["b_enc"][i],
            f"b_dec_{i}": folded["b_dec"][i],
            f"threshold_{i}": threshold_LF[i],
        }
        # Middle axis: target layer j at position j − i.
        W_dec_FJD = torch.zeros(n_feat, L - i, D, dtype=folded["b_dec"].dtype)
        for t, j in enumerate(model.targets(i)):
            W_dec_FJD[:, j - i] = folded[f"W_dec.{i}.{t}"].cpu()
        for name, tensors in ((f"W_enc_{i}", encoder), (f"W_dec_{i}", {f"W_dec_{i}": W_dec_FJD})):
            write_safetensors(directory / f"{name}.safetensors", tensors)
    write_json(directory / CIRCUIT_TRACER_CONFIG, dataclasses.asdict(dataclasses.replace(model.cfg, sparsifier="jumprelu")))
    if calibration is not None:
        write_json(directory / CALIBRATION_NAME, calibration.summary())
        print(calibration.describe())
    return directory


def load_circuit_tracer(directory: str | os.PathLike, device: torch.device | str | None = None,
                        topology: str | None = None) -> Transcoder:
    """A JumpReLU `Transcoder` read back from circuit-tracer's per-layer files (as `export_circuit_tracer` writes them).

    The config comes from vitclt_config.json when present (backbone, fingerprint, tokens); otherwise
    the shapes give layers, width and features, and the topology is a clt when any W_dec_{i} writes
    past layer i, else a plt (`topology` overrides both). Safetensors only; `CheckpointError` if a file
    is missing or its shapes disagree.
    """
    directory = Path(directory)
    n_layers = 0
    while (directory / f"W_enc_{n_layers}.safetensors").is_file():
        n_layers += 1
    if n_layers == 0:
        raise CheckpointError(f"{directory} has no W_enc_0.safetensors: pass a directory written by export_circuit_tracer "
                              "(or circuit-tracer's per-layer transcoder files)")
    enc, dec = [], []
    for i in range(n_layers):
        for name, into in ((f"W_enc_{i}", enc), (f"W_dec_{i}", dec)):
            path = directory / f"{name}.safetensors"
            try:
                into.append(safetensors.torch.load_file(path))
            except (safetensors.SafetensorError, FileNotFoundError) as err:
                raise CheckpointError(f"{path} is missing or unreadable ({err}): export the transcoder again") from None
    try:
        W_dec = [d[f"W_dec_{i}"] for i, d in enumerate(dec)]
        W_enc = [e[f"W_enc_{i}"] for i, e in enumerate(enc)]
        b_enc = torch.stack([e[f"b_enc_{i}"] for i, e in enumerate(enc)])
        b_dec = torch.stack([e[f"b_dec_{i}"] for i, e in enumerate(enc)])
        threshold_LF = torch.stack([e[f"threshold_{i}"] for i, e in enumerate(enc)])
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"{directory}: circuit-tracer files lack a tensor or disagree in shape ({err}): "
                              "export the transcoder again") from None
    n_feat, D = W_enc[0].shape
    bad = [i for i in range(n_layers) if tuple(W_dec[i].shape) != (n_feat, n_layers - i, D)]
    if bad:
        raise CheckpointError(f"{directory}: W_dec_{bad[0]} has shape {tuple(W_dec[bad[0]].shape)}, expected "
                              f"{(n_feat, n_layers - bad[0], D)} (features, target layers {bad[0]}..{n_layers - 1}, width)")
    cfg_path = directory / CIRCUIT_TRACER_CONFIG
    if cfg_path.is_file():
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg = TranscoderConfig.from_dict({**raw, "sparsifier": "jumprelu"})
    else:
        writes_ahead = any(bool(W[:, 1:].any()) for W in W_dec)
        cfg = TranscoderConfig(n_layers=n_layers, d_model=D, n_features=n_feat, topology="clt" if writes_ahead else "plt",
                               sparsifier="jumprelu")
    if topology is not None:
        cfg = dataclasses.replace(cfg, topology=topology)
    if (cfg.n_layers, cfg.d_model, cfg.features) != (n_layers, D, n_feat):
        raise CheckpointError(f"{cfg_path} describes {cfg.n_layers} layers × {cfg.d_model} × {cfg.features} features, "
                              f"the files hold {n_layers} × {D} × {n_feat}: export the transcoder again")
    state: dict[str, Tensor] = {f"W_enc.{i}": W for i, W in enumerate(W_enc)}
    state["b_enc"], state["b_dec"] = b_enc, b_dec
    targets = (lambda i: range(i, n_layers)) if cfg.topology == "clt" else (lambda i: [i])
    for i in range(n_layers):
        for t, j in enumerate(targets(i)):
            state[f"W_dec.{i}.{t}"] = W_dec[i][:, j - i].contiguous()
    for name in ("x", "y"):  # the files are in raw units: identity normalisation
        state[f"{name}_mean_LD"], state[f"{name}_scale_L"] = torch.zeros(n_layers, D), torch.ones(n_layers)
    return transcoder_from_state(cfg, jumprelu_state(state, threshold_LF), directory, device)


PRISMA_FILES = ["config.json", "weights.pt", "*.safetensors"]
"""Files of a ViT-Prisma transcoder repository: its config.json and weights (weights.pt, or safetensors)."""

PRISMA_OBJECTS = ("vit_prisma.sae.config.VisionModelSAERunnerConfig", "vit_prisma.configs.HookedViTConfig.HookedViTConfig")
"""Classes that Prisma pickles next to the weights in its .pt files; read as inert `_Opaque` records."""


class _Opaque:
    """Stands in for an object of a class vitclt does not import: it keeps the pickled state and runs none of its code."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        self.state = state


def _read_prisma_weights(directory: Path) -> tuple[dict[str, Tensor], dict | None]:
    """(state dict, the config pickled beside it or None) of a Prisma transcoder directory."""
    tensors = sorted(directory.glob("*.safetensors"))
    if tensors:
        try:
            return safetensors.torch.load_file(tensors[0]), None
        except safetensors.SafetensorError as err:
            raise CheckpointError(f"{tensors[0]} is not a readable safetensors file ({err}): download it again") from None
    pts = sorted(directory.glob("*.pt"))
    if not pts:
        raise CheckpointError(f"{directory} has no weights.pt or .safetensors file: pass a ViT-Prisma transcoder directory")
    path = pts[0]
    import pickle

    # weights_only=True is torch's restricted unpickler: tensors and plain containers, plus the stand-ins above.
    try:
        with torch.serialization.safe_globals([(_Opaque, name) for name in PRISMA_OBJECTS]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} cannot be read with the restricted unpickler ({first[:300]}): vitclt unpickles only "
                              "tensors; convert the file to safetensors where you trust it") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors (a dict with 'state_dict', or the state dict itself)")
    cfg = obj.get("cfg") if isinstance(obj, dict) else None
    cfg_state = getattr(cfg, "state", None)
    return dict(state), (cfg_state if isinstance(cfg_state, dict) else None)


def _prisma_layer(source: str | os.PathLike) -> tuple[dict, dict[str, Tensor], str]:
    """(config, state dict, where it came from) of one Prisma transcoder: a directory or a hub id."""
    from vitclt.nn.hub import download, parse_hub_id

    text = os.fspath(source)
    local = Path(text)
    ref = parse_hub_id(text)
    if not local.exists() and ref is not None:
        local = download(ref, PRISMA_FILES)
    if local.is_file():
        local = local.parent
    if not local.is_dir():
        raise CheckpointError(f"{text} is neither a directory nor a hub id: pass a ViT-Prisma transcoder directory or repo")
    state, pickled_cfg = _read_prisma_weights(local)
    cfg_path = local / "config.json"
    if cfg_path.is_file():
        cfg = read_json_object(cfg_path, CheckpointError, "download it again")
    elif pickled_cfg is not None:
        cfg = pickled_cfg
    else:
        raise CheckpointError(f"{local} has no config.json: a ViT-Prisma transcoder keeps its settings there")
    return cfg, state, str(local)


def _prisma_check(cfg: dict, state: dict[str, Tensor], where: str) -> tuple[int, int]:
    """(layer, k or 0 for ReLU) of a Prisma transcoder whose computation a vitclt PLT layer reproduces; else `CheckpointError`."""
    layer = cfg.get("hook_point_layer")
    layer = layer[0] if isinstance(layer, list) and len(layer) == 1 else layer
    if not cfg.get("is_transcoder", False) or not isinstance(layer, int):
        raise CheckpointError(f"{where} is not a single-layer ViT-Prisma transcoder (is_transcoder, hook_point_layer): "
                              "pass a CLIP-transcoder-* repository")
    hooks = (cfg.get("layer_subtype", "ln2.hook_normalized"), cfg.get("layer_out_subtype", "hook_mlp_out"))
    if hooks != ("ln2.hook_normalized", "hook_mlp_out") or cfg.get("out_hook_point_layer", layer) != layer:
        raise CheckpointError(f"{where} maps {hooks[0]} to {hooks[1]} of layer {cfg.get('out_hook_point_layer')}; a vitclt "
                              "PLT maps each block's LN2 output to its own MLP output")
    norm = cfg.get("normalize_activations", "none")
    if norm in ("layer_norm", "constant_norm_rescale"):
        raise CheckpointError(f"{where} rescales each token at run time (normalize_activations={norm}), which a vitclt "
                              "transcoder (one fixed affine normalisation per layer) cannot reproduce")
    if "W_skip" in state and bool(state["W_skip"].any()):
        raise CheckpointError(f"{where} has a skip connection (W_skip), which a vitclt transcoder does not have")
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec", "b_dec_out") if k not in state]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)}: not a ViT-Prisma transcoder state dict")
    act = cfg.get("activation_fn_str", "relu")
    if act == "topk":
        return layer, int((cfg.get("activation_fn_kwargs") or {})["k"])
    if act == "relu":
        return layer, 0
    raise CheckpointError(f"{where} uses activation {act!r}; vitclt reads ViT-Prisma transcoders with topk or relu")


def load_prisma_transcoders(sources, n_layers: int | None = None, device: torch.device | str | None = None) -> Transcoder:
    """One PLT from ViT-Prisma's per-layer transcoders (directories or hub ids such as
    ``Prisma-Multimodal/CLIP-transcoder-topk-256-x64-all_patches_1-mlp-94``), one source per layer.

    Prisma computes y = TopK_k(relu)((x − b_dec) W_enc + b_enc) W_dec + b_dec_out on LN2 outputs x;
    vitclt's layer i gets W_enc.i = W_encᵀ, b_enc = b_enc − b_dec W_enc, W_dec.i.0 = W_dec,
    b_dec = b_dec_out and ReLU-TopK with the per-layer k (ReLU transcoders become a JumpReLU with
    threshold 0; topk and relu layers cannot be mixed). Layers below `n_layers` (default: the highest
    given + 1) without a source get zero weights: they predict 0, so evaluate windows that avoid them.
    See docs/hub.md for what is refused and why.
    """
    layers: dict[int, tuple[dict, dict[str, Tensor], int]] = {}
    for source in ([sources] if isinstance(sources, (str, os.PathLike)) else list(sources)):
        cfg, state, where = _prisma_layer(source)
        layer, k = _prisma_check(cfg, state, where)
        if layer in layers:
            raise CheckpointError(f"two sources are transcoders of layer {layer}: pass one per layer")
        layers[layer] = (cfg, state, k)
    if not layers:
        raise ConfigError("pass at least one ViT-Prisma transcoder")
    L = n_layers if n_layers is not None else max(layers) + 1
    if max(layers) >= L:
        raise ConfigError(f"a source is a transcoder of layer {max(layers)}, beyond n_layers={L}")
    shapes = {tuple(s["W_enc"].shape) for _, s, _ in layers.values()}
    kinds = {k > 0 for _, _, k in layers.values()}
    if len(shapes) != 1 or len(kinds) != 1:
        raise CheckpointError(f"the layers differ in shape {sorted(shapes)} or mix topk and relu: a vitclt PLT has one "
                              "width and one sparsifier for every layer")
    D, n_feat = shapes.pop()
    topk = kinds.pop()
    ks = tuple(layers[i][2] if i in layers else 1 for i in range(L))
    first = next(iter(layers.values()))[0]
    cfg = TranscoderConfig(n_layers=L, d_model=D, n_features=n_feat, topology="plt",
                           sparsifier="relu-topk" if topk else "jumprelu", k=max(ks), k_per_layer=ks if topk else (),
                           backbone=str(first.get("model_name", "")),
                           tokens="cls" if first.get("cls_token_only") else "patches" if first.get("use_patches_only") else "all")
    state = {"b_enc": torch.zeros(L, n_feat), "b_dec": torch.zeros(L, D)}
    for i in range(L):
        W_enc_DF = W_dec_FD = None
        if i in layers:
            s = {k: v.float() for k, v in layers[i][1].items()}
            W_enc_DF, W_dec_FD = s["W_enc"], s["W_dec"]
            state["b_enc"][i] = s["b_enc"] - s["b_dec"] @ W_enc_DF
            state["b_dec"][i] = s["b_dec_out"]
        state[f"W_enc.{i}"] = torch.zeros(n_feat, D) if W_enc_DF is None else W_enc_DF.T.contiguous()
        state[f"W_dec.{i}.0"] = torch.zeros(n_feat, D) if W_dec_FD is None else W_dec_FD.contiguous()
    for name in ("x", "y"):
        state[f"{name}_mean_LD"], state[f"{name}_scale_L"] = torch.zeros(L, D), torch.ones(L)
    if topk:
        state["sparsifier.threshold_L"] = torch.zeros(L)
        state["sparsifier.threshold_seen_L"] = torch.zeros(L, dtype=torch.bool)
    else:
        state = jumprelu_state(state, torch.zeros(L, n_feat))
    absent = [i for i in range(L) if i not in layers]
    if absent:
        print(f"note: layers {absent} have no ViT-Prisma transcoder: they predict 0 (evaluate windows that avoid them)")
    return transcoder_from_state(cfg, state, "the ViT-Prisma transcoders", device)
