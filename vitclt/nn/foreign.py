"""Transcoders written by other tools, read into a `Transcoder`: circuit-tracer's per-layer files, ViT-Prisma's.

circuit-tracer's format (written by `vitclt.nn.formats.export_circuit_tracer`, read back by
`load_circuit_tracer`) is described in `vitclt.nn.formats`. ViT-Prisma's per-layer transcoders
(`load_prisma_transcoders`) are read as a PLT; their ``.pt`` files go through torch's restricted
(``weights_only``) unpickler only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from vitclt.errors import ConfigError
from vitclt.io import read_json_object
from vitclt.nn.calibrate import jumprelu_state
from vitclt.nn.config import TranscoderConfig
from vitclt.nn.formats import CIRCUIT_TRACER_CONFIG, CheckpointError, _load_state
from vitclt.nn.transcoder import Transcoder


def transcoder_from_state(cfg: TranscoderConfig, state: dict[str, Tensor], source: Path | str,
                          device: torch.device | str | None = None) -> Transcoder:
    """A frozen, eval-mode `Transcoder` of `cfg` holding `state` (names and shapes checked, `CheckpointError` naming `source`)."""
    model = Transcoder(cfg, device=device, initialize=False)
    _load_state(model, {k: v.to(device or "cpu") for k, v in state.items()}, source)
    return model.eval().requires_grad_(False)


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
