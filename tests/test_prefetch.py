"""The next block's images are prepared by the workers while the current block trains: same rows, earlier."""

import gc
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.test_stream import dataset
from vitclt.data.batches import ImageLoader, chunked
from vitclt.data.images import DatasetError
from vitclt.data.stream import ActivationStream, BackboneSource

ROOT = Path(__file__).resolve().parents[1]


class LoggedImages(list):
    """A list dataset that appends each index it is asked for to `log` (from any process); `broken` ones fail.

    After the first `slow_after` images (None: never), each takes `delay` seconds, like a large JPEG on a busy host.
    """

    def __init__(self, items, log: Path, broken=(), slow_after: int | None = None, delay: float = 0.0):
        super().__init__(items)
        self.log, self.broken, self.slow_after, self.delay = log, set(broken), slow_after, delay

    def __getitem__(self, index):
        if self.slow_after is not None and decoded(self.log).total() >= self.slow_after:
            time.sleep(self.delay)
        with open(self.log, "a") as f:  # one short append per line: atomic across processes
            f.write(f"{index}\n")
        if index in self.broken:
            raise DatasetError(f"img_{index}.png: cannot decode image, the file is corrupt or not an image")
        return super().__getitem__(index)


def decoded(log: Path) -> Counter:
    """How many times each image index was asked of the dataset."""
    return Counter(int(line) for line in log.read_text().split()) if log.exists() else Counter()


def wait_until(condition, what: str, deadline_s: float = 60.0) -> None:
    """Poll `condition` until it holds; the deadline only bounds a failing test."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"{what} did not happen within {deadline_s:.0f} s")
        time.sleep(0.02)


class WithoutPrefetch:
    """A source's rows with its `prefetch` hidden: the stream as it was before prefetching."""

    def __init__(self, source):
        self.source = source
        for name in ("n_images", "rows_per_image", "n_layers", "d_model", "token_positions", "backbone_fingerprint"):
            setattr(self, name, getattr(source, name))

    def load(self, images):
        return self.source.load(images)


def test_prefetched_blocks_equal_the_rows_without_prefetch_across_epochs(tiny_backbone):
    streams = [ActivationStream(src, batch_size=20, buffer_size=4 * 17, seed=5) for src in (
        BackboneSource(tiny_backbone, dataset(12), "all", 3, workers=2),
        WithoutPrefetch(BackboneSource(tiny_backbone, dataset(12), "all", 3, workers=2)),
        BackboneSource(tiny_backbone, dataset(12), "all", 3, workers=0))]
    for _ in range(25):  # 3 blocks per epoch, 10.2 batches per epoch: into the third epoch
        prefetched, *others = (s.next_batch() for s in streams)
        for other in others:
            for a, b in zip(prefetched, other):
                assert torch.equal(a, b)


def test_next_block_is_decoded_before_the_stream_asks_for_it(tiny_backbone, tmp_path):
    log = tmp_path / "decoded.log"
    src = BackboneSource(tiny_backbone, LoggedImages(dataset(12), log), "cls", 2, workers=1)
    stream = ActivationStream(src, batch_size=4, buffer_size=4, seed=2)  # a batch is a block: 3 per epoch
    loaded = Counter()
    for epoch, block in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]:
        stream.next_batch()  # loads (epoch, block), then asks for the next one
        loaded.update(int(i) for i in stream.block_image_indices(epoch, block))
        nxt = (epoch, block + 1) if block < 2 else (epoch + 1, 0)
        expect = loaded + Counter(int(i) for i in stream.block_image_indices(*nxt))
        wait_until(lambda: decoded(log) == expect, f"decoding block {nxt} ahead of the stream")
    # Served from what was prepared: no image of a prefetched block was decoded twice.
    assert decoded(log) == expect


@pytest.mark.parametrize("case", ["other images", "same images in other batches", "after one batch of it"])
def test_a_request_other_than_the_prefetched_one_gets_its_own_pixels(tiny_backbone, case):
    ds = dataset(10)
    reference = ImageLoader(ds, tiny_backbone.image_prep, workers=0)
    loader = ImageLoader(ds, tiny_backbone.image_prep, workers=1)
    prefetched = chunked([7, 1, 4, 9, 0, 2], 2)
    asked = {"other images": chunked([3, 5, 6, 8], 2), "same images in other batches": chunked([7, 1, 4, 9, 0, 2], 3),
             "after one batch of it": chunked([2, 0, 9], 2)}[case]
    loader.prefetch(prefetched)
    threads = prefetch_threads()
    if case == "after one batch of it":
        next(iter(loader.batches(prefetched)))  # a consumer that stops early
    for chunks in (asked, prefetched):  # and the prefetched request, asked for again afterwards
        got = list(loader.batches(chunks))
        want = list(reference.batches(chunks))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert torch.equal(g.items, w.items) and torch.equal(g.labels_B, w.labels_B)
    assert threads and not any(t.is_alive() for t in threads), "the discarded prefetch left its thread running"


def prefetch_threads() -> list[threading.Thread]:
    """The threads taking prefetched batches now."""
    return [t for t in threading.enumerate() if t.name == "vitclt-prefetch"]


def next_batch_and_warnings(stream):
    """The stream's next batch and the messages of the warnings it gave."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        batch = stream.next_batch()
    return batch, [str(w.message) for w in seen]


def test_unreadable_image_in_a_prefetched_block_is_recorded_when_the_block_is_used(tiny_backbone, tmp_path):
    order = ActivationStream(BackboneSource(tiny_backbone, dataset(12), "all"), 17, buffer_size=4 * 17, seed=4)
    bad = int(order.block_image_indices(0, 1)[1])  # in the first prefetched block, not in the first loaded one
    log = tmp_path / "decoded.log"
    a, b = (ActivationStream(BackboneSource(tiny_backbone, LoggedImages(dataset(12), tmp_path / name, broken={bad}),
                                            "all", 3, workers=workers), batch_size=17, buffer_size=4 * 17, seed=4)
            for name, workers in ((log.name, 1), ("no-workers.log", 0)))
    messages = []
    for step in range(30):  # through the block that holds it, and into the next epoch
        (batch_a, warned_a), (batch_b, warned_b) = next_batch_and_warnings(a), next_batch_and_warnings(b)
        for ta, tb in zip(batch_a, batch_b):
            assert torch.equal(ta, tb)
        assert (a.state_dict(), warned_a) == (b.state_dict(), warned_b), f"step {step}"
        messages += warned_a
        if step == 0:
            wait_until(lambda: decoded(log)[bad] == 1, "decoding the unreadable image ahead")
            assert a.state_dict()["unreadable"] == [], "recorded when a worker met it, before the stream used it"
    assert len(messages) == 1 and f"skipping unreadable image {bad} " in messages[0]
    assert [i for i, _ in a.state_dict()["unreadable"]] == [bad]


def test_a_dropped_source_stops_prefetching(tiny_backbone, tmp_path):
    log = tmp_path / "decoded.log"
    src = BackboneSource(tiny_backbone, LoggedImages(dataset(40), log, slow_after=0, delay=0.5), "cls", 1, workers=1)
    before = prefetch_threads()
    src.prefetch(range(40))
    threads = [t for t in prefetch_threads() if t not in before]
    del src
    gc.collect()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert sum(decoded(log).values()) < 40, "the whole request was decoded for a source nobody holds"


SCRIPT = """
import sys, time
from pathlib import Path
from tests.test_prefetch import LoggedImages
from tests.test_stream import dataset
from vitclt.backbones import load_backbone
from vitclt.data.stream import ActivationStream, BackboneSource

tmp, mode = Path(sys.argv[2]), sys.argv[3]
images = LoggedImages(dataset(80), tmp / "decoded.log", slow_after=40, delay=5.0)  # the next block: 200 s
stream = ActivationStream(BackboneSource(load_backbone(sys.argv[1]), images, "cls", 1, workers=1), batch_size=4,
                          buffer_size=40, seed=0)
stream.next_batch()
print("training", flush=True)
if mode == "error":
    raise RuntimeError("training stopped: non-finite loss")
if mode == "interrupted":
    while True:
        time.sleep(0.1)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["returns", "error", "interrupted"])
def test_a_run_that_stops_mid_prefetch_exits_promptly(tiny_clip_dir, tmp_path, mode):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tiny_clip_dir), str(tmp_path), mode], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "training\n", proc.stderr.read()
        if mode == "interrupted":
            wait_until(lambda: decoded(tmp_path / "decoded.log").total() > 40, "the prefetch starting")
            proc.send_signal(signal.SIGINT)  # Ctrl-C reaching the training process
        rc = proc.wait(timeout=90)  # far less than the 200 s the prefetched block would take
    finally:
        proc.kill()
        proc.wait()
    stderr = proc.stderr.read()
    expect = {"returns": 0, "error": 1, "interrupted": -signal.SIGINT}[mode]
    assert rc == expect, stderr
    assert decoded(tmp_path / "decoded.log").total() < 80
