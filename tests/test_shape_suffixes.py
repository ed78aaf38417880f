"""Shape suffixes (x_NLD, W_FD) use only the letters of the legend in docs/ARCHITECTURE.md."""

from __future__ import annotations

import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["vitclt", "bench", "tools"]
"""Everything held to the legend."""

# A name with a lowercase part that ends in an uppercase-and-digit group holding at least one letter.
SUFFIXED = re.compile(r"^(?=.*[a-z])\w*?_([A-Z0-9]*[A-Z][A-Z0-9]*)$")


def legend_letters() -> list[str]:
    """The letters of the "Shape suffixes" table, in order: every first cell, split at commas."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = text.split("## Shape suffixes", 1)[1].split("\n## ", 1)[0]
    return [cell.strip() for row in re.findall(r"^\| *([A-Z0-9, ]+?) *\|", table, flags=re.M) for cell in row.split(",")]


def suffixed_names(path: Path):
    """(line, name, suffix) of every suffixed identifier in one source file."""
    with tokenize.open(path) as f:
        for tok in tokenize.generate_tokens(f.readline):
            if tok.type == tokenize.NAME and (m := SUFFIXED.match(tok.string)):
                yield tok.start[0], tok.string, m.group(1)


def test_the_legend_gives_each_letter_one_meaning():
    letters = legend_letters()
    assert {"B", "T", "N", "L", "I", "J", "D", "F", "K", "3", "1"} <= set(letters)
    assert len(letters) == len(set(letters))


def test_shape_suffixes_use_only_legend_letters():
    letters = set(legend_letters())
    files = [p for c in CHECKED for p in ((ROOT / c).rglob("*.py") if (ROOT / c).is_dir() else [ROOT / c])]
    assert files
    bad = [f"{p.relative_to(ROOT)}:{line}: {name}" for p in files for line, name, suffix in suffixed_names(p)
           if set(suffix) - letters]
    assert not bad, "suffix letters missing from the legend in docs/ARCHITECTURE.md:\n" + "\n".join(bad)
