"""The activation stream: token selection, exact epoch coverage, mixing, resume and normalisation."""

import pytest
import torch

from tests.conftest import random_images
from vitclt.data.images import DatasetError
from vitclt.data.stream import ActivationStream, BackboneSource, StreamError, estimate_normalization
from vitclt.data.unreadable import check_dataset


def dataset(n: int, seed: int = 0) -> list:
    """`n` random images with labels: a plain list is a dataset."""
    return [(im, i % 3) for i, im in enumerate(random_images(n, seed=seed))]


def capture_all(backbone, ds, tokens):
    """x, y of the selected tokens of every image, by a direct capture: (n, T, L, D) each."""
    with backbone.capture() as cap:
        backbone.image_embeds(backbone.preprocess([im for im, _ in ds]))
    idx = backbone.token_index(tokens)
    return cap.x_BTLD()[:, idx], cap.y_BTLD()[:, idx]


def take_rows(stream, n_rows):
    """The next `n_rows` rows of `stream` as one Batch-like tuple of tensors."""
    parts = []
    got = 0
    while got < n_rows:
        parts.append(stream.next_batch())
        got += len(parts[-1].image_N)
    return [torch.cat(t)[:n_rows] for t in zip(*parts)]


@pytest.mark.parametrize("tokens,rows_per_image", [("cls", 1), ("patches", 16), ("all", 17)])
def test_one_epoch_is_every_captured_row_exactly_once(tiny_backbone, tokens, rows_per_image):
    ds = dataset(10)
    src = BackboneSource(tiny_backbone, ds, tokens, images_per_forward=3)
    assert src.rows_per_image == rows_per_image
    stream = ActivationStream(src, batch_size=7, buffer_size=3 * rows_per_image, seed=1)
    n = len(ds) * rows_per_image
    x_NLD, y_NLD, image_N, token_N = take_rows(stream, n)
    L, D = tiny_backbone.n_layers, tiny_backbone.d_model
    assert x_NLD.shape == y_NLD.shape == (n, L, D)

    key_N = image_N * tiny_backbone.n_tokens + token_N
    assert len(torch.unique(key_N)) == n, "a row was duplicated or lost within the epoch"
    x_ref, y_ref = capture_all(tiny_backbone, ds, tokens)
    positions = torch.arange(tiny_backbone.n_tokens)[tiny_backbone.token_index(tokens)]
    slot_N = torch.searchsorted(positions, token_N)
    torch.testing.assert_close(x_NLD, x_ref[image_N, slot_N], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_NLD, y_ref[image_N, slot_N], rtol=1e-5, atol=1e-5)


def test_batches_mix_many_images(tiny_backbone):
    src = BackboneSource(tiny_backbone, dataset(12), "all", images_per_forward=4)
    stream = ActivationStream(src, batch_size=34, buffer_size=12 * 17, seed=0)
    for _ in range(4):
        images = stream.next_batch().image_N
        assert len(torch.unique(images)) >= 8
        assert not torch.equal(images, images.sort().values)


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_continues_bit_identically(tiny_backbone, workers):
    a = ActivationStream(BackboneSource(tiny_backbone, dataset(9), "all", 2, workers=workers), batch_size=20,
                         buffer_size=40, seed=3)
    for _ in range(5):
        a.next_batch()
    b = ActivationStream(BackboneSource(tiny_backbone, dataset(9), "all", 2), batch_size=20, buffer_size=40, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(12):  # past block and epoch boundaries
        for ta, tb in zip(a.next_batch(), b.next_batch()):
            assert torch.equal(ta, tb)


def test_resume_with_other_settings_is_refused(tiny_backbone):
    src = BackboneSource(tiny_backbone, dataset(4), "all")
    state = ActivationStream(src, batch_size=20, seed=3).state_dict()
    with pytest.raises(StreamError, match="batch_size: saved 20, now 8"):
        ActivationStream(src, batch_size=8, seed=3).load_state_dict(state)


def test_epochs_use_different_orders(tiny_backbone):
    src = BackboneSource(tiny_backbone, dataset(6), "cls")
    stream = ActivationStream(src, batch_size=6, buffer_size=6, seed=0)
    first, second = stream.next_batch().image_N, stream.next_batch().image_N
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(6))
    assert not torch.equal(first, second)


def test_normalisation_matches_direct_computation(tiny_backbone):
    ds = dataset(8)
    stats = estimate_normalization(BackboneSource(tiny_backbone, ds, "patches"), n_tokens=10**6, progress=False)
    x_ref, y_ref = capture_all(tiny_backbone, ds, "patches")
    for got_mean, got_scale, ref in ((stats.x_mean_LD, stats.x_scale_L, x_ref), (stats.y_mean_LD, stats.y_scale_L, y_ref)):
        rows_NLD = ref.flatten(0, 1).double()
        mean_LD = rows_NLD.mean(0)
        scale_L = ((rows_NLD - mean_LD) ** 2).mean(dim=(0, 2)).sqrt()
        torch.testing.assert_close(got_mean, mean_LD.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_scale, scale_L.float(), rtol=1e-5, atol=1e-6)
        normed = (rows_NLD - mean_LD) / scale_L[:, None]
        torch.testing.assert_close(normed.pow(2).mean(dim=(0, 2)), torch.ones(len(scale_L), dtype=torch.float64))


def test_bad_settings_are_refused(tiny_backbone):
    with pytest.raises(StreamError, match="no images"):
        BackboneSource(tiny_backbone, [], "all")
    with pytest.raises(ValueError, match="token selection"):
        BackboneSource(tiny_backbone, dataset(2), "everything")
    with pytest.raises(StreamError, match="batch_size"):
        ActivationStream(BackboneSource(tiny_backbone, dataset(2)), batch_size=0)


class SyntheticSource:
    """A custom `RowSource`: per image, 4 rows of N(1e4, 0.5²) in float32, fixed per image index."""

    n_images, rows_per_image, n_layers, d_model = 50, 4, 2, 8
    token_positions = torch.arange(4)

    def load(self, images):
        rows = [torch.randn(4, 2, 2, 8, generator=torch.Generator().manual_seed(int(i))) for i in images]
        x_y = 1e4 + 0.5 * torch.cat(rows) if rows else torch.empty(0, 2, 2, 8)
        return x_y[:, 0], x_y[:, 1]


def test_normalisation_keeps_precision_for_large_means():
    src = SyntheticSource()
    stats = estimate_normalization(src, n_tokens=10**6, images_per_load=7, progress=False)
    x_NLD, _ = src.load(range(50))
    x = x_NLD.double()
    torch.testing.assert_close(stats.x_mean_LD, x.mean(0).float())
    torch.testing.assert_close(stats.x_scale_L, (x - x.mean(0)).pow(2).mean(dim=(0, 2)).sqrt().float(), rtol=1e-4, atol=0)
    batch = ActivationStream(src, batch_size=200, seed=0).next_batch()
    assert len(torch.unique(batch.image_N)) == 50


class WithBrokenImages(list):
    """A list dataset whose images at `broken` indices fail to decode, as a corrupt file does."""

    def __init__(self, items, broken):
        super().__init__(items)
        self.broken = set(broken)

    def __getitem__(self, index):
        if index in self.broken:
            raise DatasetError(f"img_{index}.png: cannot decode image, the file is corrupt or not an image")
        return super().__getitem__(index)


def test_unreadable_image_is_skipped_replaced_by_the_next_and_recorded(tiny_backbone):
    ds = WithBrokenImages(dataset(12), broken={4})
    src = BackboneSource(tiny_backbone, ds, "cls", images_per_forward=5)
    with pytest.warns(UserWarning, match=r"skipping unreadable image 4 \(1 of at most 1 skipped\): img_4\.png"):
        x_NLD, y_NLD = src.load(range(12))
    x_ref, y_ref = capture_all(tiny_backbone, dataset(12), "cls")
    expect = [5 if i == 4 else i for i in range(12)]
    torch.testing.assert_close(x_NLD, x_ref[expect].flatten(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_NLD, y_ref[expect].flatten(0, 1), rtol=1e-5, atol=1e-5)
    stream = ActivationStream(src, batch_size=5, buffer_size=4, seed=0)
    assert stream.state_dict()["unreadable"] == [[4, "img_4.png: cannot decode image, the file is corrupt or not an image"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_recorded_skips_keep_a_resumed_stream_exact_after_the_file_is_repaired(tiny_backbone, workers):
    broken = WithBrokenImages(dataset(12), broken={11})
    a = ActivationStream(BackboneSource(tiny_backbone, broken, "all", images_per_forward=2, workers=workers),
                         batch_size=20, buffer_size=40, seed=3)
    with pytest.warns(UserWarning, match="img_11"):
        for _ in range(12):  # a whole epoch: image 11 was met and skipped
            a.next_batch()
    repaired = ActivationStream(BackboneSource(tiny_backbone, dataset(12), "all", images_per_forward=2), batch_size=20,
                                buffer_size=40, seed=3)
    repaired.load_state_dict(a.state_dict())
    for _ in range(14):  # into the next epoch, where image 11 is met again
        for ta, tb in zip(a.next_batch(), repaired.next_batch()):
            assert torch.equal(ta, tb)


def test_too_many_unreadable_images_stop_with_the_first_listed(tiny_backbone):
    ds = WithBrokenImages(dataset(10), broken={2, 7})
    with pytest.warns(UserWarning, match="img_2"), pytest.raises(
            DatasetError, match=r"^2 of 10 images cannot be decoded, more than the 1 \(1%\) a run skips: img_2\.png.*; "
                                r"img_7\.png.*Repair or replace these files"):
        BackboneSource(tiny_backbone, ds, "cls", images_per_forward=10).load(range(10))
    with pytest.raises(DatasetError, match=r"^1 of 10 images cannot be decoded, more than the 0 \(0%\)"):
        BackboneSource(tiny_backbone, ds, "cls", max_unreadable=0).load(range(5))
    allowed = BackboneSource(tiny_backbone, ds, "cls", max_unreadable=0.2)
    with pytest.warns(UserWarning):
        allowed.load(range(10))
    assert [i for i, _ in allowed.unreadable.state()] == [2, 7]


def test_a_changed_image_count_says_how_to_resume(tiny_backbone):
    state = ActivationStream(BackboneSource(tiny_backbone, dataset(5), "cls"), batch_size=4).state_dict()
    with pytest.raises(StreamError, match="n_images: saved 5, now 4.*put them back"):
        ActivationStream(BackboneSource(tiny_backbone, dataset(4), "cls"), batch_size=4).load_state_dict(state)


def test_check_dataset_lists_every_unreadable_image():
    ds = WithBrokenImages(dataset(9), broken={0, 6})
    found = check_dataset(ds, workers=2, progress=False)
    assert [i for i, _ in found] == [0, 6] and "img_6.png: cannot decode" in found[1][1]
    assert check_dataset(dataset(3), progress=False) == []
