"""The circuit viewer: a static page (same conventions as the feature browser) for one pruned graph.

Layout of a viewer directory::

    index.html, assets/          the page (plain HTML, CSS and JavaScript, no dependencies)
    data/graph.js                `vitcltData("graph", {meta, nodes, edges, effects})`: the pruned graph
    graph.json                   the same payload as JSON, for scripts
    img/input.png|jpg            the image as the model sees it (centre square), for an image graph

Data files are scripts rather than JSON because browsers refuse `fetch()` of local files under
file://, but run local scripts. Feature nodes link to the feature browser (`vitclt browse`) when its
directory is known: `<browser>/feature.html?tc=<id>&layer=<l>&feature=<f>`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from vitclt.circuits.graph import KINDS, Graph
from vitclt.circuits.pipeline import Explanation
from vitclt.errors import OutputError
from vitclt.io import record_written

MARKER = ".vitclt-circuit"
"""File that marks a directory as written by `vitclt explain` (so it may be replaced)."""


def _r(x: float, digits: int = 6) -> float:
    """`x` to `digits` significant digits (the page shows 3; the JSON keeps a little more)."""
    return float(f"{x:.{digits}g}")


def payload(ex: Explanation, meta: dict, labels: list[list[str]] | None = None) -> dict:
    """The viewer's data: kept nodes (with influence, direct and total effect on the target, and a feature's label
    from `labels[layer][feature]` when given) and kept edges."""
    g, p = ex.graph, ex.pruned
    keep = np.flatnonzero(p.node_mask.numpy())
    pos = {int(i): n for n, i in enumerate(keep)}
    A = g.adjacency.double()
    direct = A[g.target]
    total = g.total_effect().double()
    fraction = g.meta.get("fraction")
    nodes = []
    for i in keep.tolist():
        kind = KINDS[int(g.kind_N[i])]
        node = {"id": g.node_id(i), "kind": kind, "layer": int(g.layer_N[i]), "token": int(g.token_N[i]),
                "feature": int(g.feature_N[i]), "value": _r(float(g.value_N[i])), "influence": _r(float(p.influence[i])),
                "direct": _r(float(direct[i])),
                "total": _r(float(total[i]) * (float(g.value_N[i]) if kind == "feature" else 1.0)),
                "norm": _r(float(g.norm_N[i]))}
        if fraction is not None:
            node["images"] = _r(fraction[i], 3)
        if labels and kind == "feature" and node["layer"] < len(labels) and node["feature"] < len(labels[node["layer"]]):
            node["label"] = labels[node["layer"]][node["feature"]]
        nodes.append(node)
    rows, cols = np.nonzero(p.edge_mask.numpy())
    edges = [[pos[int(c)], pos[int(r)], _r(float(A[r, c]))] for r, c in zip(rows.tolist(), cols.tolist())
             if int(r) in pos and int(c) in pos]
    full = {"nodes": g.n, "edges": int((A != 0).sum())}
    return {"meta": {**g.meta, **meta, "target_name": meta.get("target_name"), "score": _r(g.score),
                     "completeness": {"sum": _r(float(direct.sum()), 9), "score": _r(g.score, 9)},
                     "kept_node_fraction": _r(p.node_fraction, 4), "kept_edge_fraction": _r(p.edge_fraction, 4),
                     "full": full, "top": [[c, _r(s, 4)] for c, s in ex.top],
                     "seconds": {k: _r(v, 3) for k, v in ex.seconds.items()}},
            "nodes": nodes, "edges": edges,
            "effects": {k: {kk: (_r(vv) if isinstance(vv, float) else vv) for kk, vv in v.items()}
                        for k, v in ex.effects.items()}}


def browser_link(out: Path, browser: Path | None, transcoder_name: str) -> dict | None:
    """{"url": relative path to the feature browser, "tc": its id of the transcoder}, or None without a browser."""
    if browser is None:
        return None
    from vitclt.browser.site import read_data

    site = Path(browser) / "data" / "site.js"
    if not site.is_file():
        return None
    meta = read_data(site)
    ids = {t["name"]: t["id"] for t in meta.get("transcoders", [])}
    tc = ids.get(transcoder_name) or (next(iter(ids.values())) if len(ids) == 1 else None)
    if tc is None:
        return None
    return {"url": Path(os.path.relpath(Path(browser).resolve(), Path(out).resolve())).as_posix(), "tc": tc}


def _prepare(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} is a file: pass --out with a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise OutputError(f"output directory {out} exists and was not written by vitclt explain: "
                          "choose another --out or empty it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    except OSError as e:
        raise OutputError(f"cannot write the viewer to {out}: {e.strerror or e}; choose a writable --out") from None


def check_output(out: str | Path) -> None:
    """Raise `OutputError` now if `write_viewer` could not write to `out` (before any compute)."""
    shutil.rmtree(_prepare(Path(out)))


def write_viewer(out: str | Path, ex: Explanation, meta: dict, image: Image.Image | None = None, *,
                 class_images: Sequence[tuple[int, Image.Image]] = (), labels: list[list[str]] | None = None) -> Path:
    """Write the viewer of `ex` to `out` (replacing an earlier viewer there); returns `out`.

    `meta` adds what the page shows about the run: title, kind ("image" or "class"), target_name,
    backbone, transcoder, grid, browser (from `browser_link`), source (the image file) or dataset
    ({"spec", "split"} of a class graph's images). `class_images` are a class graph's images with their
    indices in that split (shown as a grid, each named by its index); `labels` are the feature labels
    (`vitclt.browser.site.feature_labels`) shown beside the nodes.
    """
    from vitclt.browser.site import thumbnail

    out = Path(out)
    tmp = _prepare(out)
    try:
        if image is not None or class_images:
            (tmp / "img").mkdir()
        if image is not None:
            raw, ext = thumbnail(image, 256)
            (tmp / "img" / f"input.{ext}").write_bytes(raw)
            meta = {**meta, "image": f"img/input.{ext}"}
        shown = []
        for index, im in class_images:
            raw, ext = thumbnail(im, 128)
            (tmp / "img" / f"{index}.{ext}").write_bytes(raw)
            shown.append({"index": int(index), "file": f"img/{index}.{ext}"})
        if shown:
            meta = {**meta, "images": shown}
        data = payload(ex, meta, labels)
        (tmp / "data").mkdir()
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
        (tmp / "data" / "graph.js").write_text(f'vitcltData("graph",{text});\n', encoding="utf-8")
        (tmp / "graph.json").write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        static = resources.files("vitclt.circuits").joinpath("static")
        with resources.as_file(static) as src:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        (tmp / MARKER).write_text("written by vitclt explain; `vitclt explain` may replace this directory\n")
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            out.rename(old / "viewer")
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        record_written(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def graph_summary(g: Graph) -> str:
    """One line: how many nodes of each kind."""
    counts = {k: int((g.kind_N == i).sum()) for i, k in enumerate(KINDS)}
    return ", ".join(f"{v} {k}{'es' if k == 'bias' and v != 1 else 's' if v != 1 else ''}" for k, v in counts.items())
