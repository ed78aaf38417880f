"""One sparsity knob: --k is the L0 every sparsifier ends at; TopK training is unchanged by the L0 controller."""

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from tests.test_stream import dataset
from tests.test_train import config, image_folder, train_split_folder  # noqa: F401  (the session fixture of 24 random images)
from vitclt.data.stream import BackboneSource
from vitclt.nn import Transcoder
from vitclt.training import train, transcoder_configs

TOPK_WEIGHTS_SHA256 = "50cde305a3505e9526a6bdf03c9025afbde513a58c5b422cb2f3d6baceed1fce"
"""sha256 of the weights of `test_topk_training_is_bit_identical_to_before_the_l0_controller`'s run, computed with
the code before the controller existed on this CPU build of torch: commit cad899a (the tiny test CLIP with random
LayerNorms) with the TopK tie rule of `sparsifiers.top_k_first`, which both change TopK's bits on their own."""


def weights_digest(paths) -> str:
    """sha256 over every saved tensor of the transcoders in `paths`, in name order."""
    h = hashlib.sha256()
    for path in paths:
        for name, tensor in sorted(load_file(path / "model.safetensors").items()):
            h.update(name.encode())
            h.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_topk_training_is_bit_identical_to_before_the_l0_controller(tiny_clip_dir, image_folder, tmp_path):  # noqa: F811
    cfg = config(tiny_clip_dir, image_folder, tmp_path / "run", topology=("clt", "plt"),
                 sparsifier=("relu-topk", "abs-topk", "batch-topk"), k=(4, 8), steps=30, warmup_steps=5,
                 checkpoint_every=30, log_every=10, dead_tokens=500)
    paths = train(cfg)
    assert weights_digest(paths) == TOPK_WEIGHTS_SHA256


def held_out_l0_L(path, backbone) -> torch.Tensor:
    """Mean active features per row and layer of a saved transcoder on every token of 64 images it never saw."""
    x_NLD, y_NLD = BackboneSource(backbone, dataset(64, seed=99), "all").load(range(64))
    model = Transcoder.from_pretrained(path).eval()
    with torch.no_grad():
        return (model.encode(x_NLD).values_NLK != 0).sum(-1).float().mean(0)


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """512 random PNGs: enough rows that a JumpReLU's thresholds do not fit the training images alone."""
    return train_split_folder(tmp_path_factory.mktemp("many"), N_MANY)


N_MANY = 512


def test_k_is_the_held_out_l0_jumprelu_ends_at(tiny_clip_dir, tiny_backbone, many_images, tmp_path, capsys):
    cfg = config(tiny_clip_dir, many_images, tmp_path / "run", sparsifier=("jumprelu",), k=(4, 12), steps=200, lr=5e-3,
                 buffer_size=N_MANY * 17, norm_tokens=8192, images_per_forward=64)
    paths = train(cfg)
    assert [p.name for p in paths] == ["jumprelu-k4", "jumprelu-k12"]
    for path, k in zip(paths, (4, 12)):
        l0_L = held_out_l0_L(path, tiny_backbone)
        assert ((l0_L - k).abs() <= 0.05 * k).all(), (path.name, l0_L.tolist())
    assert "jumprelu-k12: thresholds scaled by" in capsys.readouterr().out


def test_fixed_coefficient_keeps_one_jumprelu_and_lets_l0_end_anywhere(tiny_clip_dir, image_folder, tmp_path):  # noqa: F811
    cfg = config(tiny_clip_dir, image_folder, tmp_path / "run", sparsifier=("jumprelu",), k=(4, 12), steps=20,
                 warmup_steps=2, sparsity_control="fixed")
    assert list(transcoder_configs(cfg, 3, 32)) == ["jumprelu"]
    [path] = train(cfg)
    assert path.name == "jumprelu"


def test_a_sweeps_models_equal_the_same_models_trained_alone(tiny_clip_dir, image_folder, tmp_path):  # noqa: F811
    sweep = config(tiny_clip_dir, image_folder, tmp_path / "sweep", topology=("clt", "plt"), sparsifier=("relu-topk", "jumprelu"),
                   k=(4, 8), steps=30, warmup_steps=5, checkpoint_every=30, log_every=10)
    paths = {p.name: p for p in train(sweep)}
    assert sorted(paths) == sorted(f"{t}-{s}-k{k}" for t in ("clt", "plt") for s in ("relu-topk", "jumprelu") for k in (4, 8))
    for topology, sparsifier, k in (("plt", "jumprelu", 8), ("clt", "relu-topk", 4), ("clt", "jumprelu", 4)):
        alone = config(tiny_clip_dir, image_folder, tmp_path / f"{topology}-{sparsifier}-{k}", topology=(topology,),
                       sparsifier=(sparsifier,), k=(k,), steps=30, warmup_steps=5, checkpoint_every=30, log_every=10)
        [path] = train(alone)
        a, b = load_file(path / "model.safetensors"), load_file(paths[f"{topology}-{sparsifier}-k{k}"] / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), (topology, sparsifier, k)


def test_resuming_an_older_fixed_coefficient_run_names_the_flag_to_pass(tiny_clip_dir, image_folder, tmp_path):  # noqa: F811
    from vitclt.training import TrainingError
    from vitclt.training.checkpoint import STATE_FILE, load_state_tensors, read_state_meta, save_state

    cfg = config(tiny_clip_dir, image_folder, tmp_path / "run", sparsifier=("jumprelu",), steps=4, warmup_steps=1,
                 checkpoint_every=2, sparsity_control="fixed")
    train(cfg)
    # What an older vitclt wrote: no sparsity_control in the saved config, unfinished, no controller state.
    meta = read_state_meta(cfg.out)
    del meta["train_config"]["optim"]["sparsity_control"], meta["train_config"]["optim"]["sparsity_control_rate"]
    meta.update(finished=False, step=2)
    meta.pop("version")
    tensors = load_state_tensors(cfg.out)
    (cfg.out / STATE_FILE).unlink()
    save_state(cfg.out, tensors, meta)
    resumed = config(tiny_clip_dir, image_folder, tmp_path / "run", sparsifier=("jumprelu",), steps=4, warmup_steps=1,
                     checkpoint_every=2, resume=True)
    with pytest.raises(TrainingError, match="resume it with --sparsity-control fixed"):
        train(resumed)
