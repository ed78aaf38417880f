"""Reading and checking what `vitclt explain` and `vitclt intervene` take: transcoder, backbone, image, classes."""

from __future__ import annotations

import difflib
from pathlib import Path

from PIL import Image

from vitclt.circuits.errors import CircuitError


def find_transcoder(run_dir: str | Path, name: str | None = None) -> tuple[str, Path]:
    """(name, directory) of the transcoder in `run_dir` (a transcoder directory or a run holding several)."""
    from vitclt.eval.suite import pick_transcoder

    return pick_transcoder(run_dir, name)


def check_transcoder(transcoder, backbone) -> None:
    """Raise `CircuitError` unless the transcoder was trained on this backbone (shape, and weights when both are known)."""
    try:
        transcoder.check_compatible(backbone.n_layers, backbone.d_model)
    except ValueError as e:
        raise CircuitError(str(e)) from None
    if transcoder.cfg.topology == "sae":
        raise CircuitError("an SAE reads the MLP output it rebuilds, so it cannot replace the MLP: explain a clt or plt")
    want = transcoder.cfg.backbone_fingerprint
    if want:
        have = backbone.fingerprint
        if have and have != want:
            raise CircuitError(
                f"the transcoder was trained on another backbone ({transcoder.cfg.backbone or 'unnamed'}, weights "
                f"fingerprint {want}) than {backbone.name} (fingerprint {have}): pass --backbone "
                f"{transcoder.cfg.backbone or 'SPEC'} or use a transcoder trained on this backbone")


def read_image(path: str | Path) -> Image.Image:
    """The image at `path` as RGB; `CircuitError` if it is missing or cannot be decoded."""
    from vitclt.data.images import DatasetError, open_image

    try:
        return open_image(path)
    except DatasetError as e:
        raise CircuitError(f"{e}: pass --image with a readable image file (PNG, JPEG, ...)") from None


def load_classes(spec: str, templates: str | None = None) -> tuple[list[str], list[str]]:
    """(class names, prompt templates) of a dataset spec (`demo`, `cifar100:DIR`, `folder:DIR`, ...)."""
    from vitclt.data.datasets import load_dataset
    from vitclt.data.prompts import get_templates
    from vitclt.eval.zeroshot import dataset_templates

    data = load_dataset(spec)
    return list(data.classnames), (get_templates(templates) if templates else dataset_templates(data))


def class_index(name: str, classnames: list[str]) -> int:
    """The index of class `name`; `CircuitError` naming the closest names if it is not in the list."""
    if name in classnames:
        return classnames.index(name)
    lower = [c.lower() for c in classnames]
    if name.lower() in lower:
        return lower.index(name.lower())
    close = difflib.get_close_matches(name, classnames, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else f"the list starts {', '.join(classnames[:5])}"
    raise CircuitError(f"class {name!r} is not among the {len(classnames)} classes of --classes: {hint}")


def class_members(spec: str, split: str, name: str, limit: int):
    """(dataset split, indices of its first `limit` images of class `name`); `CircuitError` if it has none,
    naming the other split that has some (with how many), or saying that no split has any."""
    from vitclt.data.datasets import load_dataset
    from vitclt.errors import VitcltError

    def members(data) -> list[int]:
        if name not in data.classnames:
            return []
        label = list(data.classnames).index(name)
        return [i for i, y in enumerate(data.labels) if int(y) == label]

    data = load_dataset(spec, split)
    found = members(data)[:limit]
    if found:
        return data, found
    held_out = split.lower() in ("test", "val", "eval", "validation")
    elsewhere = []
    for other in ("train", "test"):
        if (other == "test") == held_out:
            continue  # the split just searched
        try:
            n = len(members(load_dataset(spec, other)))
        except VitcltError:  # no such split
            continue
        if n:
            elsewhere.append(f"the {other} split has {n}: pass --split {other}")
    hint = "; ".join(elsewhere) or "no other split has any either: pick another class"
    raise CircuitError(f"no images of class {name!r} in the {split} split of {spec}; {hint}")
