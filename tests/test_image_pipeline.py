"""The image pipeline: uint8 preparation on the host + normalisation on the device equals each model's processor;
process workers give the same batches as the main process; corrupt images; reduced JPEG decoding is opt-in."""

import io
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import random_images
from vitclt.backbones import load_backbone
from vitclt.backbones.tiny import build_tiny_clip, build_tiny_dinov2, build_tiny_open_clip, build_tiny_siglip, build_tiny_timm
from vitclt.backbones.transforms import EvalTransform
from vitclt.data.batches import image_batches, pixel_batches
from vitclt.data.images import DatasetError, open_image, reduced_decoding
from vitclt.data.stream import BackboneSource
from vitclt.runtime import RuntimeConfig

FAMILIES = {"clip": build_tiny_clip, "siglip": build_tiny_siglip, "dinov2": build_tiny_dinov2,
            "openclip": build_tiny_open_clip, "timm": build_tiny_timm}
MODES = ["RGB", "L", "RGBA", "P", "CMYK", "I;16"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, backbone) for a tiny model of each family, loaded like a real checkpoint."""
    return request.param, load_backbone(FAMILIES[request.param](tmp_path_factory.mktemp(request.param)))


def torchvision_eval(transform: EvalTransform, image: Image.Image) -> torch.Tensor:
    """open_clip's and timm's eval transform, written out: Resize(short side) → CenterCrop → ToTensor → Normalize."""
    image = image.convert("RGB")
    w, h = image.size
    s = transform.resize
    size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    resized = image.resize(size, transform.resample) if size != image.size else image
    c = transform.crop
    left, top = int(round((size[0] - c) / 2.0)), int(round((size[1] - c) / 2.0))
    arr = np.asarray(resized.crop((left, top, left + c, top + c)), dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.asarray(transform.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(transform.std, dtype=np.float32)[:, None, None]
    return torch.from_numpy((arr - mean) / std)


def processor_pixels(bb, image: Image.Image) -> torch.Tensor:
    """The family's own processor on one image (after PIL's RGB conversion, as every backbone does)."""
    if hasattr(bb, "transform"):
        return torchvision_eval(bb.transform, image)
    return bb.processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"][0]


def image_of(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rgb = random_images(1, seed=seed, size=(width, height))[0]
    if mode == "I;16":
        return Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    return rgb.convert(mode)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(1, 90), height=st.integers(1, 90), mode=st.sampled_from(MODES), seed=st.integers(0, 99))
def test_prepared_then_normalised_pixels_equal_the_processor_bit_for_bit(family, width, height, mode, seed):
    _, bb = family
    image = image_of(mode, width, height, seed)
    u8 = bb.prepare(image)
    assert u8.dtype == np.uint8 and u8.shape == (3, bb.image_size, bb.image_size)
    assert torch.equal(bb.normalize(torch.from_numpy(u8)[None])[0], processor_pixels(bb, image))


def test_preprocess_is_normalize_after_prepare_for_a_batch_of_odd_sizes(family):
    _, bb = family
    images = [image_of(m, w, h, i) for i, (m, w, h) in enumerate([("RGB", 45, 38), ("L", 31, 77), ("RGBA", 120, 9)])]
    expected = torch.stack([processor_pixels(bb, im) for im in images])
    assert torch.equal(bb.preprocess(images), expected)


def test_the_value_table_is_the_processors_own_rescale_and_normalise(family):
    """Every 8-bit value of every channel, through the processor's full path, equals the table (no crop needed)."""
    _, bb = family
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    table_3V = bb.image_prep.table()
    for v in (0, 1, 127, 128, 254, 255):
        flat = Image.fromarray(np.full((40, 40, 3), v, dtype=np.uint8))
        assert torch.equal(processor_pixels(bb, flat)[:, 0, 0], table_3V[:, v])
    assert torch.equal(torch.from_numpy(bb.image_prep.scale(Image.fromarray(ramp))[:, 0]), table_3V)


class PidLabels:
    """Random images whose label is the id of the process that decoded them (proves where decoding ran)."""

    def __init__(self, n):
        self.images = random_images(n, seed=3, size=(41, 37))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], os.getpid()


def test_worker_processes_give_the_same_batches_in_the_same_order_as_the_main_process(tiny_backbone):
    data = PidLabels(11)
    main = list(pixel_batches(tiny_backbone, data, 3, workers=0))
    pooled = list(pixel_batches(tiny_backbone, data, 3, workers=2))
    assert [len(b[1]) for b in main] == [len(b[1]) for b in pooled] == [3, 3, 3, 2]
    for (px_main, pid_main), (px_pool, pid_pool) in zip(main, pooled):
        assert torch.equal(px_main, px_pool)
        assert set(pid_main.tolist()) == {os.getpid()} and os.getpid() not in set(pid_pool.tolist())
    assert torch.equal(torch.cat([b[0] for b in main]), tiny_backbone.preprocess(data.images))


def test_backbone_source_rows_with_workers_equal_rows_without(tiny_backbone):
    data = [(im, 0) for im in random_images(10, seed=4, size=(50, 33))]
    order = [7, 2, 9, 0, 5, 1, 8]
    rows = [BackboneSource(tiny_backbone, data, "all", 3, workers=w).load(order) for w in (0, 2)]
    assert torch.equal(rows[0][0], rows[1][0]) and torch.equal(rows[0][1], rows[1][1])


def test_a_source_serves_several_requests_with_the_same_workers(tiny_backbone):
    data = [(im, 0) for im in random_images(6, seed=5)]
    source = BackboneSource(tiny_backbone, data, "cls", 2, workers=2)
    first = source.load([0, 1, 2])
    source.load([5, 4, 3])
    assert torch.equal(source.load([0, 1, 2])[0], first[0])


@pytest.mark.parametrize("workers", [0, 2])
def test_loading_leaves_the_global_random_state_alone(tiny_backbone, workers):
    """A training run's RNG state is checkpointed; loading images must not draw from it (exact resume)."""
    data = [(im, 0) for im in random_images(4)]
    before = torch.get_rng_state()
    BackboneSource(tiny_backbone, data, "cls", 2, workers=workers).load([0, 1, 2, 3])
    list(pixel_batches(tiny_backbone, data, 2, workers=workers))
    assert torch.equal(torch.get_rng_state(), before)


class Broken:
    """Random images, where the images at `broken` fail to decode like a corrupt file."""

    def __init__(self, n, broken):
        self.images = random_images(n, seed=6)
        self.broken = broken

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if i in self.broken:
            return self.images[i], open_image(b"not an image", name=f"img{i}.jpg")
        return self.images[i], 0


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_in_a_worker_is_one_line_naming_it(tiny_backbone, workers):
    with pytest.raises(DatasetError, match=r"^img4\.jpg: cannot decode image[^\n]*$") as err:
        list(pixel_batches(tiny_backbone, Broken(6, {4}), 2, workers=workers))
    assert "Traceback" not in str(err.value)
    with pytest.raises(DatasetError, match=r"^img4\.jpg: cannot decode image"):
        list(image_batches(Broken(6, {4}), 2, workers=workers))


def test_training_skips_and_records_a_corrupt_image_met_in_a_worker(tiny_backbone):
    rows = {}
    for workers in (0, 2):
        source = BackboneSource(tiny_backbone, Broken(8, {2, 3}), "cls", 3, workers=workers, max_unreadable=0.3)
        with pytest.warns(UserWarning) as caught:
            rows[workers] = source.load(range(8))[0]
        assert [str(w.message).split(":")[0] for w in caught] == [
            "skipping unreadable image 2 (1 of at most 2 skipped)", "skipping unreadable image 3 (2 of at most 2 skipped)"]
        assert sorted(source.unreadable.errors) == [2, 3]
    assert torch.equal(rows[0], rows[2])
    clean = BackboneSource(tiny_backbone, Broken(8, set()), "cls", 3).load([0, 1, 4, 4, 4, 5, 6, 7])[0]
    assert torch.equal(rows[2], clean), "a skipped image's rows are the next readable image's"


def test_an_image_recorded_unreadable_stays_skipped_even_when_a_worker_reads_it(tiny_backbone):
    data = [(im, 0) for im in random_images(5, seed=8)]
    source = BackboneSource(tiny_backbone, data, "cls", 5, workers=2)
    source.unreadable.restore([[1, "img1.jpg: was corrupt"]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = source.load(range(5))[0]
    assert torch.equal(got, BackboneSource(tiny_backbone, data, "cls", 5).load([0, 2, 2, 3, 4])[0])


def jpeg_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    random_images(1, seed=9, size=(width, height))[0].save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_reduced_decoding_keeps_both_sides_at_least_the_target_and_only_inside_its_block():
    data = jpeg_bytes(256, 200)
    assert open_image(data).size == (256, 200)
    with reduced_decoding(32):
        assert open_image(data).size == (64, 50)  # 1/4: 1/8 would leave a side of 25 < 32
    with reduced_decoding(100):
        assert open_image(data).size == (128, 100)
    with reduced_decoding(101):
        assert open_image(data).size == (256, 200), "a half-size decode would leave a side of 100 < 101"
    assert open_image(data).size == (256, 200)
    png = io.BytesIO()
    random_images(1, size=(256, 200))[0].save(png, format="PNG")
    with reduced_decoding(32):
        assert open_image(png.getvalue()).size == (256, 200), "only JPEGs have a reduced decode"


class JpegFiles:
    """Large JPEGs decoded by `open_image`, as the file datasets do."""

    def __init__(self, n):
        self.files = [jpeg_bytes(160 + 8 * i, 130) for i in range(n)]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return open_image(self.files[i]), 0


def test_fast_decode_is_off_by_default_and_opt_in(tiny_backbone):
    assert RuntimeConfig().fast_decode is False
    data = JpegFiles(4)
    exact = tiny_backbone.preprocess([data[i][0] for i in range(4)])
    [(default, _)] = pixel_batches(tiny_backbone, data, 4, workers=2)
    assert torch.equal(default, exact)
    assert not BackboneSource(tiny_backbone, data, "cls").load([0])[0].equal(
        BackboneSource(tiny_backbone, data, "cls", fast_decode=True).load([0])[0])
    [(fast, _)] = pixel_batches(tiny_backbone, data, 4, workers=2, fast_decode=True)
    assert fast.shape == exact.shape and not torch.equal(fast, exact)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_batches_on_cuda_equal_the_cpu_pixels(tiny_clip_dir):
    data = PidLabels(9)
    cpu = torch.cat([px for px, _ in pixel_batches(load_backbone(tiny_clip_dir), data, 4, workers=2)])
    gpu = torch.cat([px for px, _ in pixel_batches(load_backbone(tiny_clip_dir, device="cuda"), data, 4, workers=2)])
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


def test_the_value_table_is_built_once_per_device(family):
    _, bb = family
    assert bb.image_prep is bb.image_prep
    assert bb.image_prep.table(bb.device) is bb.image_prep.table(bb.device)
