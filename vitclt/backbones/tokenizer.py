"""CLIP's real BPE tokenizer, built from the vocabulary file bundled with the package.

`assets/bpe_simple_vocab_16e6.txt.gz` is OpenAI CLIP's merge list (MIT licence; the same file ships
in `open_clip_torch`). Laid out as a `transformers` CLIPTokenizer (vocab.json + merges.txt, in CLIP's
own vocabulary order) it gives token ids identical to CLIP's, so locally built models (tests, the
embedded demo model) carry a real tokenizer without any download.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

N_MERGES = 49152 - 256 - 2
"""CLIP keeps this many merges from the file: 49408 ids = 512 byte tokens + merges + 2 specials."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer_files(out_dir: str | Path) -> Path:
    """Write CLIP's `vocab.json` and `merges.txt` into `out_dir` (created if needed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = resources.files("vitclt.assets").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    # transformers drops the first line of merges.txt as a header.
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out_dir


def _cache_dir() -> Path:
    base = os.environ.get("VITCLT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vitclt")
    return Path(base) / "clip_tokenizer"


@lru_cache(maxsize=1)
def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """CLIP's tokenizer (49408 ids, `<|endoftext|>` = 49407), built once and cached on disk."""
    cache = _cache_dir()
    if not (cache / "vocab.json").is_file() or not (cache / "merges.txt").is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        # Build in a sibling temp dir and rename, so concurrent processes never read half a file.
        tmp = Path(tempfile.mkdtemp(dir=cache.parent))
        write_clip_tokenizer_files(tmp)
        try:
            os.replace(tmp, cache)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; its copy is identical
    return CLIPTokenizer(str(cache / "vocab.json"), str(cache / "merges.txt"), model_max_length=max_length)
