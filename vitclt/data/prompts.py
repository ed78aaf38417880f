"""Zero-shot prompt templates and class names: the shipped sets and user overrides.

Shipped template sets (``vitclt/assets/templates/NAME.txt``):

- ``cifar100``: OpenAI CLIP's 18 templates for CIFAR-10/100 (``data/prompts.md``
  of the CLIP repository);
- ``imagenet``: CLIP's 80 ImageNet templates (notebook
  ``Prompt_Engineering_for_ImageNet``), also the default for ImageNet-100;
- ``imagenet7``: the 7 of those 80 that CLIP's authors found by forward
  selection (slightly better than all 80 for small models);
- ``coco``: the 18 generic photo templates again. COCO images are everyday
  photographs, and the rendition templates of the ImageNet set (origami,
  tattoo, video game, ...) were added for ImageNet-R and describe nothing
  in COCO; see docs/datasets.md.

Shipped class names (``vitclt/assets/classnames/``): ``cifar100`` (CLIP's
list), ``imagenet100`` (CLIP's cleaned ImageNet names for the CMC 100
classes, see :func:`imagenet100_classes`) and ``coco`` (the 80 official
category names).

File formats, for overrides: one entry per line, UTF-8; blank lines and lines
starting with ``#`` are ignored. Each template holds exactly one ``{}``, the
place of the class name.
"""

from __future__ import annotations

from collections import Counter
from importlib import resources
from pathlib import Path

from vitclt.data.images import DatasetError

TEMPLATE_SETS = ("cifar100", "imagenet", "imagenet7", "coco")
"""Names of the shipped template sets."""

CLASSNAME_SETS = ("cifar100", "imagenet100", "coco")
"""Names of the shipped class-name lists."""


def _lines(text: str) -> list[tuple[int, str]]:
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]


def _read(path: str | Path, what: str) -> str:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"{what} file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: {what} file must be UTF-8 text ({exc})") from exc


def _asset(*parts: str) -> str:
    return resources.files("vitclt").joinpath("assets", *parts).read_text(encoding="utf-8")


def parse_templates(text: str, source: str = "<templates>") -> list[str]:
    """Parse template text (one per line); every template must hold exactly one ``{}``."""
    templates = []
    for number, line in _lines(text):
        rest = line.replace("{}", "", 1)
        if "{" in rest or "}" in rest or rest == line:
            raise DatasetError(
                f"{source}:{number}: template {line!r} must contain exactly one '{{}}' (where the class name "
                "goes) and no other braces, e.g. 'a photo of a {}.'"
            )
        templates.append(line)
    if not templates:
        raise DatasetError(f"{source}: no templates found (one per line, each with '{{}}')")
    return templates


def load_templates(path: str | Path) -> list[str]:
    """Read prompt templates from a file, one per line, each with one ``{}``."""
    return parse_templates(_read(path, "template"), str(path))


def get_templates(name_or_path: str | Path) -> list[str]:
    """A shipped template set by name (see :data:`TEMPLATE_SETS`) or a template file by path."""
    if str(name_or_path) in TEMPLATE_SETS:
        return parse_templates(_asset("templates", f"{name_or_path}.txt"), f"templates/{name_or_path}.txt")
    if not Path(name_or_path).expanduser().is_file():
        raise DatasetError(f"unknown template set {str(name_or_path)!r}: expected one of {list(TEMPLATE_SETS)} "
                           "or the path of a file with one template per line")
    return load_templates(name_or_path)


def parse_classnames(text: str, source: str = "<classnames>", n_expected: int | None = None) -> list[str]:
    """Parse class names (one per line, label order), checking the count if ``n_expected`` is given."""
    names = [line for _, line in _lines(text)]
    if not names:
        raise DatasetError(f"{source}: no class names found (one per line, in label order)")
    if n_expected is not None and len(names) != n_expected:
        raise DatasetError(f"{source}: has {len(names)} class names but the dataset has {n_expected} classes; "
                           "give one name per line, in label order")
    duplicates = sorted(n for n, count in Counter(names).items() if count > 1)
    if duplicates:
        raise DatasetError(f"{source}: duplicate class names {duplicates}; zero-shot needs distinct names")
    return names


def load_classnames(path: str | Path, n_expected: int | None = None) -> list[str]:
    """Read class names from a file, one per line in label order; error if the count is not ``n_expected``."""
    return parse_classnames(_read(path, "class-name"), str(path), n_expected)


def imagenet100_classes() -> list[tuple[str, str]]:
    """The ImageNet-100 (CMC) classes as ``(wnid, CLIP class name)``, in label order (sorted wnids)."""
    rows = [line.split("\t") for _, line in _lines(_asset("classnames", "imagenet100.tsv"))]
    return [(row[0], row[1]) for row in rows]


def builtin_classnames(name: str) -> list[str]:
    """A shipped class-name list by name (see :data:`CLASSNAME_SETS`), in label order."""
    if name == "imagenet100":
        return [label for _, label in imagenet100_classes()]
    if name not in CLASSNAME_SETS:
        raise DatasetError(f"no shipped class names for {name!r}: expected one of {list(CLASSNAME_SETS)}")
    return parse_classnames(_asset("classnames", f"{name}.txt"), f"classnames/{name}.txt")


def build_prompts(classnames: list[str], templates: list[str]) -> list[list[str]]:
    """Every template filled with every class name: ``prompts[c][t]``."""
    return [[template.format(name) for template in templates] for name in classnames]
