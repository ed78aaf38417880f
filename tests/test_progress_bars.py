"""The long phases of explain and browse show progress bars, and --no-progress silences them; browse says what it reads."""

import pytest

from tests.conftest import random_images
from tests.test_browser import make_run
from vitclt.browser import build_browser
from vitclt.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("progress")
    image = root / "photo.png"
    random_images(1, seed=5)[0].save(image)
    return (*make_run(root, tiny_backbone), image)


@pytest.mark.parametrize("progress", [True, False])
def test_explain_shows_its_phases_unless_told_not_to(run, tmp_path, capsys, progress):
    run_dir, spec, image = run
    flag = [] if progress else ["--no-progress"]
    main(["explain", str(run_dir), "--class-images", "green apple", "--classes", spec, "--max-images", "2",
          "--out", str(tmp_path / "class"), *flag])
    main(["explain", str(run_dir), "--image", str(image), "--classes", spec, "--effects-top", "2",
          "--out", str(tmp_path / "image"), *flag])
    err = capsys.readouterr().err
    shown = ["explain: attributing images", "explain: attribution", "explain: pruning", "explain: effects of 2 features"]
    assert [phase in err for phase in shown] == [progress] * len(shown), err


@pytest.mark.parametrize("progress", [True, False])
def test_browse_shows_the_work_after_the_streaming_pass(run, tiny_backbone, tmp_path, capsys, progress):
    run_dir, spec, _ = run
    build_browser(run_dir, spec, tmp_path / "browser", backbone=str(tiny_backbone.name), images_per_forward=5, top_k=4,
                  samples=4, vocab_size=20, progress=progress)
    err = capsys.readouterr().err
    shown = ["browse: text labels", "browse: pages of clt", "browse: thumbnails", "browse: exports of clt"]
    assert [phase in err for phase in shown] == [progress] * len(shown), err


def test_browse_of_a_folder_without_splits_says_which_images_it_browses(run, tiny_backbone, tmp_path, capsys):
    run_dir, spec, _ = run
    flat = spec + "/test"  # the class folders themselves: no train/ or test/ inside, so vitclt holds out a part
    build_browser(run_dir, flat, tmp_path / "browser", backbone=str(tiny_backbone.name), images_per_forward=5, top_k=2,
                  samples=2, vocab_size=0, exports=False, progress=False)
    out = capsys.readouterr().out
    assert "note: folder:test has no train/ or test/ folders, so vitclt holds out" in out, out
    assert out.index("note:") < out.index("browsed")
