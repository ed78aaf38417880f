"""The disk cache: a round trip gives back the stream's rows, and mismatched settings are refused."""

import dataclasses
import json

import pytest
import torch

from tests.test_stream import WithBrokenImages, dataset, take_rows
from vitclt.data.cache import CacheError, build_cache, cache_key, open_cache, open_or_build_cache
from vitclt.data.stream import ActivationStream, BackboneSource


@pytest.fixture
def source(tiny_backbone):
    return BackboneSource(tiny_backbone, dataset(7), "all", images_per_forward=3)


def test_cached_stream_equals_live_stream(source, tmp_path):
    key = cache_key(source, "tiny", "random:7", dtype="float32")
    cache = build_cache(source, key, tmp_path / "cache", shard_images=3, progress=False)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "metadata.json", "x_00000.npy", "x_00001.npy", "x_00002.npy", "y_00000.npy", "y_00001.npy", "y_00002.npy"]
    n = source.n_images * source.rows_per_image
    live = take_rows(ActivationStream(source, batch_size=16, buffer_size=40, seed=2), n)
    cached = take_rows(ActivationStream(open_cache(tmp_path / "cache", expect=key), batch_size=16, buffer_size=40, seed=2), n)
    assert torch.equal(live[2], cached[2]) and torch.equal(live[3], cached[3])  # same rows, same order
    torch.testing.assert_close(cached[0], live[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached[1], live[1], rtol=1e-5, atol=1e-5)
    x_NLD, _ = cache.load([6, 0])
    torch.testing.assert_close(x_NLD, source.load([6, 0])[0], rtol=1e-5, atol=1e-5)


def test_float16_cache_rounds_only(source, tmp_path):
    key = cache_key(source, "tiny", "random:7")
    cache = build_cache(source, key, tmp_path / "cache", progress=False)
    x_NLD, y_NLD = cache.load(range(7))
    assert x_NLD.dtype == torch.float16
    x_ref, y_ref = source.load(range(7))
    torch.testing.assert_close(x_NLD.float(), x_ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(y_NLD.float(), y_ref, rtol=1e-3, atol=1e-3)
    meta = json.loads((tmp_path / "cache" / "metadata.json").read_text())
    assert meta["key_hash"] == key.digest() and meta["key"]["tokens"] == "all"


def test_mismatched_cache_is_refused(source, tiny_backbone, tmp_path):
    key = cache_key(source, "tiny", "random:7")
    build_cache(source, key, tmp_path / "cache", progress=False)
    with pytest.raises(CacheError, match="tokens: cache has 'all', requested 'cls'"):
        open_cache(tmp_path / "cache", expect=dataclasses.replace(key, tokens="cls"))
    other = cache_key(BackboneSource(tiny_backbone, dataset(5), "all"), "tiny", "random:5")
    with pytest.raises(CacheError, match="n_images: cache has 7, requested 5"):
        open_or_build_cache(BackboneSource(tiny_backbone, dataset(5), "all"), other, tmp_path / "cache")
    with pytest.raises(CacheError, match="already exists"):
        build_cache(source, key, tmp_path / "cache", progress=False)
    with pytest.raises(CacheError, match="no activation cache"):
        open_cache(tmp_path / "nowhere")


def test_cache_records_the_images_it_skipped(tiny_backbone, tmp_path):
    src = BackboneSource(tiny_backbone, WithBrokenImages(dataset(7), broken={3}), "cls", images_per_forward=3)
    key = cache_key(src, "tiny", "random:7")
    with pytest.warns(UserWarning, match="img_3"):
        build_cache(src, key, tmp_path / "cache", progress=False)
    cache = open_cache(tmp_path / "cache", expect=key)
    assert json.loads((tmp_path / "cache" / "metadata.json").read_text())["unreadable"] == src.unreadable.state()
    assert cache.unreadable.state() == src.unreadable.state() and [i for i, _ in src.unreadable.state()] == [3]
    assert ActivationStream(cache, batch_size=4).state_dict()["unreadable"] == src.unreadable.state()
