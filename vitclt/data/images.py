"""Decoding images with PIL into plain 8-bit RGB, with clear errors.

Every dataset kind hands its images through :func:`to_rgb` so the backbone
always sees the same thing, whatever the file stored:

- grayscale (``L``, ``1``), CMYK, YCbCr, ... are converted with PIL's own
  conversion;
- 16/32-bit grayscale (``I;16``, ``I``, ``F``) is rescaled to 0..255 (PIL's
  direct conversion would clip it to white);
- anything with transparency (``RGBA``, ``LA``, ``PA``, palette images with a
  transparent colour) is **composited on a white background**, so transparent
  pixels become white rather than whatever colour the alpha channel hides.

A file that PIL cannot decode raises :class:`DatasetError` naming the file and
the cause, never a raw PIL traceback from deep inside a data loader.

Inside :func:`reduced_decoding`, JPEG files are decoded at a reduced size (PIL's draft mode: the
decoder's DCT scaling by 1/2, 1/4 or 1/8) whenever both sides stay at least the given side. That
is several times faster for large photos but **approximate**: the pixels differ from a full decode
followed by the processor's resize, so it is opt-in (``--fast-decode``) and never the default.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
from PIL import Image

from vitclt.errors import VitcltError

BACKGROUND_RGB = (255, 255, 255)
"""Colour that transparent pixels are composited onto."""


class DatasetError(VitcltError, ValueError):
    """A dataset cannot be found, parsed or decoded; the message says what and how to fix it."""


_DRAFT_SIDE: ContextVar[int | None] = ContextVar("vitclt_draft_side", default=None)
"""Inside `reduced_decoding`: the smallest side a reduced JPEG decode must keep."""


@contextmanager
def reduced_decoding(side: int | None) -> Iterator[None]:
    """Within this block, `open_image` decodes JPEGs at a reduced size whose sides stay ≥ `side` (None: full size).

    Approximate (see the module docstring): only for callers that opted in.
    """
    token = _DRAFT_SIDE.set(side)
    try:
        yield
    finally:
        _DRAFT_SIDE.reset(token)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` as 8-bit RGB (transparency composited on white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Decode an image file (a path or its bytes) into RGB.

    ``name`` is what error messages call the image (defaults to the path).
    Raises :class:`DatasetError` if the file is missing, truncated or not an image.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<image bytes>")
    try:
        with warnings.catch_warnings():
            # A truncated or odd-but-decodable file warns deep inside PIL; the
            # decode below either succeeds or raises, which is what callers need.
            warnings.simplefilter("ignore")
            handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
            with handle, Image.open(handle) as image:
                side = _DRAFT_SIDE.get()
                if side and image.format == "JPEG":
                    image.draft(None, (side, side))
                image.load()
                return to_rgb(image)
    except FileNotFoundError as exc:
        raise DatasetError(f"image file not found: {label}") from exc
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"{label}: image is too large to decode safely ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc) or type(exc).__name__
        raise DatasetError(f"{label}: cannot decode image, the file is corrupt or not an image ({reason})") from exc
