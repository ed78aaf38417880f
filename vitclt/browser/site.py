"""The static site: pages and assets copied from ``static/``, data as small JavaScript files, images as thumbnails.

Layout of a site directory::

    index.html, feature.html, assets/   the pages (plain HTML, CSS and JavaScript, no dependencies)
    data/site.js                        what was browsed: dataset, transcoders, image files and labels
    data/<tc>/index-L<l>.js             one row per feature of layer l (columns as arrays)
    data/<tc>/L<l>/s<n>.js              features n·S … (n+1)·S − 1 of layer l in full (null: dead)
    img/<i>.png|jpg                     thumbnails of the images the pages show

Every data file is a call ``vitcltData(key, payload)``: browsers refuse ``fetch()`` of local files
under ``file://``, but they run local scripts, so the same files work from disk and from a server.
Per-token activations are uint8 (0–255 of the feature's maximum), base64 per list of images.
"""

from __future__ import annotations

import base64
import json
import shutil
from importlib import resources
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from vitclt.browser.collect import TopList

SHARD_SIZE = 64
"""Features per detail shard."""


def thumbnail(image: Image.Image, size: int) -> tuple[bytes, str]:
    """The centre square of `image` (what CLIP's resize + centre crop sees), at most `size` pixels: (bytes, extension).

    Small images stay PNG at their own resolution (the pages scale them up without smoothing);
    larger ones become JPEG.
    """
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = image.convert("RGB").crop((left, top, left + side, top + side))
    if side > size:
        im = im.resize((size, size), Image.BICUBIC)
    out = BytesIO()
    if im.size[0] <= 64:
        im.save(out, "PNG", optimize=True)
        return out.getvalue(), "png"
    im.save(out, "JPEG", quality=85)
    return out.getvalue(), "jpg"


def write_data(path: Path, key: str, payload) -> None:
    """Write one data file: ``vitcltData("key", payload);``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    path.write_text(f"vitcltData({json.dumps(key)},{text});\n", encoding="utf-8")


def read_data(path: Path):
    """The payload of a data file written by `write_data`."""
    text = Path(path).read_text(encoding="utf-8")
    return json.loads(text[text.index(",") + 1 : text.rindex(")")])


def feature_labels(site: Path, tc_id: str) -> list[list[str]]:
    """The label of every feature of transcoder `tc_id` in the browser at `site`, per layer: its *sees* label where one
    beats its shuffled baseline (the source that names what a feature tracks most often, docs/browser.md), else its
    top direct-path class label, else its top word; [] when the site has no such transcoder.

    Other pages (the circuit viewer) read feature labels through this function alone, so that a new label
    source changes here and nowhere else.
    """
    site = Path(site)
    meta = read_data(site / "data" / "site.js")
    tc = next((t for t in meta.get("transcoders", []) if t["id"] == tc_id), None)
    if tc is None:
        return []
    labels = []
    for layer in range(tc["n_layers"]):
        index = read_data(site / "data" / tc_id / f"index-L{layer}.js")
        sees = index.get("sees") or [""] * len(index["label"])
        labels.append([s or c or w for s, c, w in zip(sees, index["label"], index["word"])])
    return labels


def copy_static(out: Path) -> None:
    """Copy the pages and assets shipped in vitclt/browser/static into `out`."""
    static = resources.files("vitclt.browser").joinpath("static")
    with resources.as_file(static) as src:
        shutil.copytree(src, out, dirs_exist_ok=True)


def quantised_tokens(top: TopList, max_LF: np.ndarray) -> np.ndarray:
    """uint8 (L, F, K, T) token activations: 255 is the feature's maximum, negatives are 0."""
    scale = np.where(max_LF > 0, max_LF, 1.0)[:, :, None, None]
    return np.rint(np.clip(top.tokens_LFKT.numpy() / scale, 0, 1) * 255).astype(np.uint8)


def _rounded(a: np.ndarray, digits: int = 4) -> list:
    return np.round(a.astype(np.float64), digits).tolist()


class ListView:
    """One TopList as numpy arrays for page writing: valid entries, rounded values, base64 tokens."""

    def __init__(self, top: TopList, max_LF: np.ndarray):
        self.valid_LFK = np.isfinite(top.score_LFK.numpy())
        self.image_LFK = top.image_LFK.numpy()
        self.value_LFK = np.round(top.value_LFK.numpy().astype(np.float64), 4)
        self.tokens_LFKT = quantised_tokens(top, max_LF)

    def entries(self, layer: int, feature: int, by_value: bool = False) -> tuple[list, str]:
        """[[image, activation], ...] and the base64 tokens of one feature, best first (or by activation)."""
        keep = np.flatnonzero(self.valid_LFK[layer, feature])
        if by_value:
            keep = keep[np.argsort(-self.value_LFK[layer, feature, keep], kind="stable")]
        images = self.image_LFK[layer, feature, keep].tolist()
        values = self.value_LFK[layer, feature, keep].tolist()
        tokens = base64.b64encode(self.tokens_LFKT[layer, feature, keep].tobytes()).decode("ascii")
        return [[i, v] for i, v in zip(images, values)], tokens
