"""The `Backbone` interface every model family implements, and MLP capture / replacement.

A vision transformer block computes ``h = h + attn(ln1(h)); h = h + mlp(ln2(h))``. A transcoder
reads ``x_ℓ = ln2(h)`` (the MLP's input) and predicts ``y_ℓ = mlp(x_ℓ)`` (the MLP's output), so one
forward hook on each block's MLP module sees both and serves capture and replacement alike. Where a
layer scale multiplies the MLP output before the residual add (DINOv2, some timm ViTs), y is what is
added, ``ls(mlp(x))``, read by a second hook on the layer scale (`MLPSite`), so that replacing y is
still exact. Adapters only say where the MLPs are and how to embed images and text; the hook logic
lives here.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .errors import BackboneError
from .transforms import pixels_from_uint8

if TYPE_CHECKING:
    from .classifiers import LinearHead
    from .transforms import ImagePrep

TokenSel = str | Sequence[int]
"""Which token positions: "cls", "patches", "all", or explicit indices into the sequence."""

ReplaceFn = Callable[[int, Tensor, Tensor], Tensor | None]
"""``fn(layer, x_BTD, y_BTD) -> y_new_BTD``: x is the MLP input (LN2 output), y the MLP output.

Called at every layer up to the last replaced one (see `Backbone.replace`); its return value is used
at the replaced layers only (None is allowed elsewhere)."""


class Replacement(NamedTuple):
    """What `Backbone.replace` takes: a function, the layers it replaces, and at which tokens."""

    fn: ReplaceFn
    """Called as ``fn(layer, x_BTD, y_BTD)``; returns the new MLP output (B, T, D)."""
    layers: Sequence[int]
    """Layers whose MLP output is replaced."""
    tokens: TokenSel = "all"
    """Token positions replaced at those layers; the others keep the true output."""


class MLPSite(NamedTuple):
    """Where block ℓ's MLP is read: its input at `mlp`, its output where it joins the residual stream."""

    mlp: nn.Module
    """The MLP module; its first argument is the LN2 output x."""
    out: nn.Module
    """The module whose output is added to the residual stream: the MLP itself, or a layer scale applied after it."""


def token_index(tokens: TokenSel, n_tokens: int, n_prefix: int) -> slice | Tensor:
    """Positions of the selected tokens in a sequence of `n_tokens` with `n_prefix` prefix tokens.

    Prefix tokens (CLIP's CLS, then any register tokens) come first; "cls" means the first prefix token
    and "patches" the tokens after all prefix tokens. A model without prefix tokens (SigLIP, which
    pools its patch tokens with an attention head) has no CLS token, so "cls" is an error there.
    """
    if isinstance(tokens, str):
        if tokens == "all":
            return slice(None)
        if tokens == "cls":
            if n_prefix == 0:
                raise BackboneError("this model has no CLS token (it pools its patch tokens): "
                                    "select tokens with 'patches', 'all' or a list of indices")
            return slice(0, 1)
        if tokens == "patches":
            return slice(n_prefix, n_tokens)
        raise BackboneError(f"unknown token selection {tokens!r}: use 'cls', 'patches', 'all' or a list of indices")
    idx = torch.as_tensor(list(tokens), dtype=torch.long)
    if idx.numel() == 0 or idx.min() < 0 or idx.max() >= n_tokens:
        raise BackboneError(f"token indices {list(tokens)} out of range for a sequence of {n_tokens} tokens")
    return idx


@dataclass
class Capture:
    """Every layer's MLP input and output from the forward passes run inside `Backbone.capture()`.

    `inputs[ℓ]` is the LN2 output of block ℓ and `outputs[ℓ]` the MLP output, each (B, T, D).
    Under a replacement, `outputs[ℓ]` is still the true MLP output of that (possibly cascaded) input.
    """

    inputs: list[Tensor | None] = field(default_factory=list)
    """Per layer, the MLP input x_BTD (LN2 output) of the last forward; None before any forward."""
    outputs: list[Tensor | None] = field(default_factory=list)
    """Per layer, the MLP output y_BTD of the last forward."""

    def x_BTLD(self) -> Tensor:
        """All layers' MLP inputs stacked on a layer axis: (B, T, L, D)."""
        return torch.stack(self.inputs, dim=2)

    def y_BTLD(self) -> Tensor:
        """All layers' MLP outputs stacked on a layer axis: (B, T, L, D)."""
        return torch.stack(self.outputs, dim=2)


class Backbone(abc.ABC):
    """A frozen vision transformer whose blocks' MLPs can be captured and replaced.

    Subclasses set `name`, `n_layers`, `d_model`, `n_prefix_tokens`, `image_size`, `patch_size`
    and implement `mlps`, `image_prep`, `image_embeds` and, for models with a text tower,
    `text_embeds` and `logit_scale_bias`. A model whose MLP output passes through another module
    (a layer scale) before the residual add overrides `mlp_sites`; a model with its own classifier
    overrides `own_head`.
    """

    name: str
    n_layers: int
    d_model: int
    n_prefix_tokens: int
    image_size: int
    patch_size: int
    has_text_tower: bool = False
    """Whether `text_embeds` works, so that the task head can be zero-shot from class names."""

    @property
    def n_tokens(self) -> int:
        """Sequence length: prefix tokens plus one token per patch."""
        return self.n_prefix_tokens + (self.image_size // self.patch_size) ** 2

    @property
    def fingerprint(self) -> str:
        """A 16-hex-digit digest of the vision tower's weights, to tell two backbones of the same shape apart.

        BLAKE2b over every tensor of `fingerprint_tensors`, in order: its name, its shape and its
        values converted to float32. The same weights give the same fingerprint whichever dtype they
        were stored or loaded in as long as the values are equal (float16 and bfloat16 convert to
        float32 exactly), so loading a float16 checkpoint in float32 keeps it; loading float32 weights
        in float16 rounds them and changes it. Computed on first use (about a second for ViT-B on the
        CPU) and cached: the backbone is frozen.
        """
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            cached = self._fingerprint = weights_fingerprint(self.fingerprint_tensors())
        return cached

    @abc.abstractmethod
    def fingerprint_tensors(self) -> Iterable[tuple[str, Tensor]]:
        """The named weights that determine the image path (blocks, embeddings, projection), in a fixed order."""

    @property
    @abc.abstractmethod
    def mlps(self) -> Sequence[nn.Module]:
        """The blocks' MLP modules in forward order; their input is the LN2 output."""

    @property
    def mlp_sites(self) -> Sequence[MLPSite]:
        """Per block, where capture and replacement read the MLP input and its residual-stream output."""
        return [MLPSite(m, m) for m in self.mlps]

    @property
    def has_cls_token(self) -> bool:
        """Whether token selection "cls" exists (the first prefix token)."""
        return self.n_prefix_tokens > 0

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where the model's weights live."""

    @property
    @abc.abstractmethod
    def image_prep(self) -> ImagePrep:
        """The model's own preprocessing, split into host preparation and a value table (`transforms`)."""

    def prepare(self, image: Image.Image) -> np.ndarray:
        """A PIL image → resized and cropped uint8 pixels (3, H, W), on the host (what decoding workers run)."""
        return self.image_prep.prepare(image)

    def normalize(self, u8_B3HW: Tensor) -> Tensor:
        """uint8 pixels → pixels_B3HW on the model's device and in its dtype: the processor's rescale and
        normalise, done on the device, bit-identical to the processor's float32 values."""
        values_3V = self.image_prep.table(self.device)
        return pixels_from_uint8(u8_B3HW, values_3V).to(next(self.mlps[0].parameters()).dtype)

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """PIL images → pixels_B3HW, exactly as the model's own processor does (`normalize` ∘ `prepare`)."""
        return self.normalize(torch.from_numpy(np.stack([self.prepare(im) for im in images])))

    @abc.abstractmethod
    def image_embeds(self, pixels_B3HW: Tensor) -> Tensor:
        """The image representation the task head reads, (B, P), float32.

        With a text tower (CLIP, SigLIP): the projected, L2-normalised embedding. Without one: the
        pooled features a classifier reads (DINOv2: the final-norm CLS token; timm: the pre-logits).
        """

    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        """The model's projected, L2-normalised text embeddings (N, P); vision-only models raise."""
        raise BackboneError(f"{self.name} has no text tower, so it cannot do zero-shot classification: "
                            "use a linear probe or the checkpoint's own classifier (vitclt.backbones.heads)")

    def logit_scale_bias(self) -> tuple[float, float]:
        """The model's own zero-shot scoring: logits = scale · cosine + bias (CLIP: bias 0)."""
        raise BackboneError(f"{self.name} has no text tower, so it has no zero-shot scoring")

    def own_head(self) -> LinearHead | None:
        """The checkpoint's own classifier as a `LinearHead` on `image_embeds`, or None if it has none."""
        return None

    def token_index(self, tokens: TokenSel) -> slice | Tensor:
        """Positions of `tokens` ("cls", "patches", "all" or indices) in this model's sequence."""
        return token_index(tokens, self.n_tokens, self.n_prefix_tokens)

    @contextmanager
    def capture(self) -> Iterator[Capture]:
        """Record every layer's MLP input and output during the forward passes in this block.

        ``with backbone.capture() as cap: backbone.image_embeds(pixels_B3HW)`` leaves, for every
        layer ℓ, ``cap.inputs[ℓ]`` = the LN2 output and ``cap.outputs[ℓ]`` = the MLP output, each
        (B, T, D) and detached; ``cap.x_BTLD()`` / ``cap.y_BTLD()`` stack them. The hooks keep
        references, not copies, so capture costs almost nothing on top of the forward; a later
        forward inside the same block overwrites the record. Under a `replace`, the outputs are
        the true MLP outputs of the (possibly already changed) inputs, not the replacements.
        """
        cap = Capture(inputs=[None] * self.n_layers, outputs=[None] * self.n_layers)

        def record_input(layer: int):
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                cap.inputs[layer] = args[0].detach()

            return hook

        def record_output(layer: int):
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                cap.outputs[layer] = output.detach()

            return hook

        def record_both(layer: int):
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                cap.inputs[layer] = args[0].detach()
                cap.outputs[layer] = output.detach()

            return hook

        # Prepended, so that capture sees the true MLP output even under a replacement.
        handles = []
        for i, site in enumerate(self.mlp_sites):
            if site.mlp is site.out:
                handles.append(site.mlp.register_forward_hook(record_both(i), prepend=True))
            else:
                handles.append(site.mlp.register_forward_hook(record_input(i), prepend=True))
                handles.append(site.out.register_forward_hook(record_output(i), prepend=True))
        try:
            yield cap
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def replace(self, fn: ReplaceFn, layers: Sequence[int], tokens: TokenSel = "all") -> Iterator[None]:
        """Within this block, the MLP output at `layers` and `tokens` is `fn`'s output instead.

        `fn(layer, x_BTD, y_BTD)` is called at *every* layer up to the last replaced one, in forward
        order, so a stateful replacement (a cross-layer transcoder, whose output at layer j sums the
        codes of all layers i ≤ j) sees each MLP input of the current, possibly already replaced,
        forward pass. Its return value is used only at the replaced layers and tokens, so changes
        cascade into every later layer's input.
        """
        layers = sorted({int(layer) for layer in layers})
        if not layers:
            raise BackboneError("replace() needs at least one layer")
        if layers[0] < 0 or layers[-1] >= self.n_layers:
            raise BackboneError(f"layers {layers} out of range for a backbone with {self.n_layers} layers")
        idx = self.token_index(tokens)
        replaced = set(layers)
        sites = self.mlp_sites
        x_seen: dict[int, Tensor] = {}  # the MLP input of the current forward, where the output module is another

        def remember_input(layer: int):
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                x_seen[layer] = args[0]

            return hook

        def make_hook(layer: int):
            def hook(module: nn.Module, args: tuple, y_BTD: Tensor) -> Tensor | None:
                x_BTD = args[0] if sites[layer].mlp is sites[layer].out else x_seen.pop(layer)
                y_new_BTD = fn(layer, x_BTD, y_BTD)
                if layer not in replaced:
                    return None
                if y_new_BTD is None or y_new_BTD.shape != y_BTD.shape:
                    got = None if y_new_BTD is None else tuple(y_new_BTD.shape)
                    raise BackboneError(f"replacement at layer {layer} returned {got}, expected {tuple(y_BTD.shape)}")
                if isinstance(idx, slice) and idx == slice(None):
                    return y_new_BTD.to(y_BTD.dtype)
                out_BTD = y_BTD.clone()
                out_BTD[:, idx] = y_new_BTD[:, idx].to(y_BTD.dtype)
                return out_BTD

            return hook

        handles = []
        for i in range(layers[-1] + 1):
            if sites[i].mlp is not sites[i].out:
                handles.append(sites[i].mlp.register_forward_hook(remember_input(i)))
            handles.append(sites[i].out.register_forward_hook(make_hook(i)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def weights_fingerprint(named_tensors: Iterable[tuple[str, Tensor]]) -> str:
    """16 hex digits of BLAKE2b over each tensor's name, shape and float32 values, in the given order."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in named_tensors:
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        values = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(values.numpy().data)
    return digest.hexdigest()
