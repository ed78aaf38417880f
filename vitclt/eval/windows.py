"""Windows of layers and their one grammar, shared by `eval --windows` and `zeroshot --ablate-layers`.

A window is a contiguous run of layers, both ends included. Written as text it is one of:

- `START-END` (or `START→END`): layers START to END, e.g. `3-11`;
- `N`: the single layer N, e.g. `5` (= `5-5`);
- `all`: every layer;
- `last:N`: the last N layers, e.g. `last:2` (= `10-11` for 12 layers).

A list of windows is written with commas or as separate arguments: `0-11,3-11` or `0-11 3-11`.
`eval` evaluates each window as one replacement setting; `zeroshot` ablates the union of the
windows' layers. Results are keyed by `Window` values; `Window.label` makes the JSON key.
Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from vitclt.errors import ConfigError

GRAMMAR = "START-END (e.g. 3-11), a single layer N, 'all', or 'last:N', separated by commas or spaces"
"""The window grammar in one line, for error messages and help texts."""


class Window(NamedTuple):
    """A contiguous window of layers, both ends included."""

    start: int
    end: int

    @property
    def layers(self) -> list[int]:
        """The layers in the window, in order."""
        return list(range(self.start, self.end + 1))

    @property
    def label(self) -> str:
        """`"3-11"`: the window's key in JSON outputs."""
        return f"{self.start}-{self.end}"


def default_windows(n_layers: int) -> list[Window]:
    """The paper's windows ending at the last layer: 0→11, 3→11, 7→11, 10→11 for 12 layers.

    Other depths scale the starts proportionally (0, L/4, 7L/12, L−2, rounded), dropping duplicates.
    """
    last = n_layers - 1
    starts = {0, round(n_layers / 4), round(7 * n_layers / 12), n_layers - 2}
    return [Window(s, last) for s in sorted(min(max(s, 0), last) for s in starts)]


def parse_window(text: str, n_layers: int | None) -> Window:
    """One window from its text form (see the module docstring), checked against the backbone's depth.

    With `n_layers` None (before a backbone is loaded) only the form is checked: the syntax, the order
    of START-END, no negative layer; `all` and `last:N` then read as the window 0-0.
    """
    spec = text.strip().replace("→", "-")
    try:
        if spec in ("all", "*"):
            window = Window(0, (n_layers or 1) - 1)
        elif spec.startswith("last:"):
            count = int(spec[len("last:"):])
            if count < 1:
                raise ValueError
            window = Window(n_layers - count, n_layers - 1) if n_layers is not None else Window(0, 0)
        else:
            lo, sep, hi = spec.partition("-")
            window = Window(int(lo), int(hi) if sep else int(lo))
    except ValueError:
        raise ConfigError(f"cannot read layer window {text!r}: use {GRAMMAR}") from None
    if window.start > window.end:
        raise ConfigError(f"layer window {text!r} is reversed: write START-END with START ≤ END, e.g. "
                          f"{window.end}-{window.start}")
    if n_layers is not None and not 0 <= window.start <= window.end <= n_layers - 1:
        raise ConfigError(f"layer window {text!r} is out of range: this backbone has layers 0-{n_layers - 1}")
    return window


def parse_windows(specs: str | Iterable[str], n_layers: int | None) -> list[Window]:
    """Windows from a list of specs, each of which may hold several separated by commas; in the order given.

    `n_layers` None checks only their form (`check_windows`)."""
    texts = [specs] if isinstance(specs, str) else list(specs)
    parts = [p for text in texts for p in text.split(",") if p.strip()]
    windows = [parse_window(p, n_layers) for p in parts]
    if len(set(windows)) != len(windows) and (n_layers is not None or len(set(parts)) != len(parts)):
        raise ConfigError(f"a layer window is listed twice in {', '.join(parts)}: list each once")
    return windows


def check_windows(specs: Iterable[str], flag: str) -> None:
    """Raise `ConfigError` naming `flag` if a window is malformed or reversed (before anything is loaded)."""
    try:
        parse_windows(specs, None)
    except ConfigError as e:
        raise ConfigError(f"{flag}: {e}") from None


def union_layers(windows: Iterable[Window]) -> list[int]:
    """Every layer covered by any of `windows`, sorted."""
    return sorted({layer for w in windows for layer in w.layers})
