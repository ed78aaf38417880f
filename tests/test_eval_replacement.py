"""Cascaded replacement: exact bookkeeping of codes, windows and token subsets."""

import pytest
import torch

from vitclt.backbones import Replacement
from vitclt.backbones.heads import ZeroShotHead
from vitclt.errors import ConfigError
from vitclt.eval.replacement import (
    CascadedReplacement,
    GridBatch,
    ReplacementGrid,
    Setting,
    Window,
    clean_setting,
    default_windows,
    encode_rows,
    transcoder_setting,
    zero_setting,
)
from vitclt.eval.windows import parse_windows, union_layers
from vitclt.eval.zeroshot import zero_mlp
from vitclt.nn import Transcoder, TranscoderConfig

from .conftest import random_images

TOKENS = ("cls", "patches", "all")


def make_transcoder(topology: str = "clt", sparsifier: str = "relu-topk", n_layers: int = 3, d_model: int = 32,
                    n_features: int = 64, k: int = 4, seed: int = 0, scale: float = 20.0) -> Transcoder:
    """A random transcoder whose reconstructions are large enough to move the model's outputs."""
    torch.manual_seed(seed)
    tc = Transcoder(TranscoderConfig(n_layers=n_layers, d_model=d_model, n_features=n_features, topology=topology,
                                     sparsifier=sparsifier, k=k, jumprelu_init_threshold=0.5))
    with torch.no_grad():
        for W in tc.decoder_weights():
            W.mul_(scale)
        tc.b_dec.normal_(0, 0.05)
    return tc.eval()


@pytest.fixture(scope="module")
def pixels(tiny_backbone):
    return tiny_backbone.preprocess(random_images(6, seed=3))


def _embed(bb, pixels, replacement=None):
    if replacement is None:
        return bb.image_embeds(pixels)
    with bb.replace(*replacement):
        return bb.image_embeds(pixels)


def _clean(bb, pixels):
    with bb.capture() as cap:
        emb = bb.image_embeds(pixels)
    return emb, cap


def test_default_windows_are_the_papers_and_scale_with_depth():
    assert default_windows(12) == [Window(0, 11), Window(3, 11), Window(7, 11), Window(10, 11)]
    assert default_windows(3) == [Window(0, 2), Window(1, 2), Window(2, 2)]
    assert default_windows(24) == [Window(0, 23), Window(6, 23), Window(14, 23), Window(22, 23)]



def test_one_window_grammar_for_windows_and_ablated_layers():
    assert parse_windows("0-11, 3→11,5-5", 12) == [Window(0, 11), Window(3, 11), Window(5, 5)]
    assert parse_windows(["0-11", "3-11,7"], 12) == [Window(0, 11), Window(3, 11), Window(7, 7)]
    assert parse_windows(["all", "last:2"], 12) == [Window(0, 11), Window(10, 11)]
    assert parse_windows((), 12) == []
    assert union_layers(parse_windows("0,4,7", 12)) == [0, 4, 7]
    assert union_layers(parse_windows(["3-5", "4-6"], 12)) == [3, 4, 5, 6]
    for bad, message in (("3-12", "out of range"), ("5-3", "reversed.*e.g. 3-5"), ("a-b", "START-END"), ("last:0", "START-END"),
                         ("1-2,1-2", "listed twice")):
        with pytest.raises(ConfigError, match=message):
            parse_windows(bad, 12)


def test_true_mlp_output_gives_clean_accuracy_in_every_setting(tiny_backbone, pixels):
    bb = tiny_backbone
    head = ZeroShotHead(torch.nn.functional.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)), dim=-1))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    identity = lambda layer, x, y: y  # noqa: E731
    settings = [clean_setting()]
    for w in default_windows(bb.n_layers) + [Window(1, 1)]:
        for t in TOKENS:
            settings.append(Setting(f"id/{w.label}/{t}", lambda codes, w=w, t=t: Replacement(identity, w.layers, t)))
            settings.append(zero_setting(f"zero/{w.label}/{t}", w, t))
    grid = ReplacementGrid(bb, head, settings)
    grid.update(GridBatch(pixels, labels, {}))
    top1 = grid.top1()
    assert all(v == top1["clean"] for k, v in top1.items() if k.startswith("id/"))
    clean = bb.image_embeds(pixels)
    for w in default_windows(bb.n_layers):
        for t in TOKENS:
            assert torch.equal(_embed(bb, pixels, Replacement(identity, w.layers, t)), clean)
            # The zero control must change something, or the identity check above proves nothing;
            # except patches at the last layer only: CLIP's embedding reads the CLS token alone.
            if (w.start, t) == (bb.n_layers - 1, "patches"):
                continue
            assert not torch.allclose(_embed(bb, pixels, Replacement(zero_mlp, w.layers, t)), clean)


def test_last_layer_replacement_equals_manual_decode_of_clean_codes(tiny_backbone, pixels):
    bb, tc = tiny_backbone, make_transcoder()
    last = bb.n_layers - 1
    _, cap = _clean(bb, pixels)
    B, T, D = cap.inputs[0].shape
    codes = [tc.encode_layer(layer, cap.inputs[layer].flatten(0, 1)) for layer in range(bb.n_layers)]
    y_hat_BTD = tc.decode_layer(last, codes).view(B, T, D)
    manual = _embed(bb, pixels, Replacement(lambda layer, x, y: y_hat_BTD, [last], "all"))
    clean_codes = [encode_rows(tc, layer, cap.inputs[layer], cap.outputs[layer]) for layer in range(bb.n_layers)]
    for prefix in (None, clean_codes):
        fn = CascadedReplacement(tc, [last], bb.token_index("all"), T, prefix)
        got = _embed(bb, pixels, Replacement(fn, [last], "all"))
        torch.testing.assert_close(got, manual, rtol=0, atol=1e-6)
    assert not torch.allclose(manual, bb.image_embeds(pixels), atol=1e-3)


class Recorder:
    """Wraps a replacement function and keeps what it returned at each layer."""

    def __init__(self, fn):
        self.fn, self.out = fn, {}

    def __call__(self, layer, x, y):
        out = self.fn(layer, x, y)
        if out is not None:
            self.out[layer] = out.clone()
        return out


@pytest.mark.parametrize("tokens", TOKENS)
def test_codes_inside_the_window_come_from_the_replaced_forward(tiny_backbone, pixels, tokens):
    bb, tc = tiny_backbone, make_transcoder()
    window = [1, 2]
    idx = bb.token_index(tokens)
    _, clean = _clean(bb, pixels)
    clean_codes = [encode_rows(tc, layer, clean.inputs[layer], clean.outputs[layer]) for layer in range(bb.n_layers)]
    for prefix in (None, clean_codes):
        rec = Recorder(CascadedReplacement(tc, window, idx, bb.n_tokens, prefix))
        with bb.capture() as cap, bb.replace(rec, window, tokens):
            bb.image_embeds(pixels)
        # Manual layer-by-layer: every layer's codes from the LN2 outputs this replaced forward saw.
        B, T, D = cap.inputs[0].shape
        codes = [tc.encode_layer(layer, cap.inputs[layer][:, idx].flatten(0, 1)) for layer in range(bb.n_layers)]
        for layer in window:
            want = tc.decode_layer(layer, codes[: layer + 1]).view(B, -1, D)
            torch.testing.assert_close(rec.out[layer][:, idx], want, rtol=0, atol=1e-6)
        torch.testing.assert_close(cap.inputs[1], clean.inputs[1], rtol=0, atol=0)
    # The cascade is real: layer 2's input differs from the clean one, so clean codes would be wrong.
    assert not torch.allclose(cap.inputs[2][:, idx], clean.inputs[2][:, idx], atol=1e-4)
    stale = tc.decode_layer(2, [tc.encode_layer(i, clean.inputs[i][:, idx].flatten(0, 1)) for i in range(3)])
    assert not torch.allclose(rec.out[2][:, idx], stale.view(B, -1, D), atol=1e-4)


def test_only_the_selected_tokens_are_replaced(tiny_backbone, pixels):
    bb, tc = tiny_backbone, make_transcoder()
    rec = Recorder(CascadedReplacement(tc, [0], bb.token_index("cls"), bb.n_tokens))
    with bb.capture() as cap, bb.replace(rec, [0], "cls"):
        bb.image_embeds(pixels)
    torch.testing.assert_close(rec.out[0][:, 1:], cap.outputs[0][:, 1:], rtol=0, atol=0)
    assert not torch.allclose(rec.out[0][:, :1], cap.outputs[0][:, :1])


@pytest.mark.parametrize("topology", ["plt", "sae"])
def test_plt_and_sae_replace_from_their_own_layer(tiny_backbone, pixels, topology):
    bb, tc = tiny_backbone, make_transcoder(topology)
    rec = Recorder(CascadedReplacement(tc, [1], bb.token_index("all"), bb.n_tokens))
    with bb.capture() as cap, bb.replace(rec, [1], "all"):
        bb.image_embeds(pixels)
    source = cap.outputs[1] if topology == "sae" else cap.inputs[1]
    want = tc.decode_layer(1, [None, tc.encode_layer(1, source.flatten(0, 1))])
    torch.testing.assert_close(rec.out[1], want.view_as(rec.out[1]), rtol=0, atol=1e-6)


def test_grid_runs_transcoder_settings_with_clean_codes(tiny_backbone, pixels):
    bb, tc = tiny_backbone, make_transcoder()
    head = ZeroShotHead(torch.nn.functional.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(1)), dim=-1))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    _, cap = _clean(bb, pixels)
    clean_codes = [encode_rows(tc, layer, cap.inputs[layer], cap.outputs[layer]) for layer in range(bb.n_layers)]
    settings = [transcoder_setting(f"{w.label}/{t}", tc, bb, w, t) for w in default_windows(3) for t in TOKENS]
    grid = ReplacementGrid(bb, head, settings)
    grid.update(GridBatch(pixels, labels, {id(tc): clean_codes}))
    grid.update(GridBatch(pixels, labels, {}))  # without clean codes the transcoder encodes itself
    top1 = grid.top1()
    assert grid.n == 12 and set(top1) == {s.key for s in settings}
    with pytest.raises(ValueError, match="duplicate"):
        ReplacementGrid(bb, head, settings + settings[:1])
