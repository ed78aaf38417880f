"""`explain --class-images` for a class whose images are all in another split names that split."""

import pytest

from tests.conftest import write_image_folder
from tests.test_browser import make_run
from vitclt.cli import main


def test_a_class_found_only_in_another_split_names_that_split(tiny_backbone, tmp_path, capsys):
    run, _ = make_run(tmp_path, tiny_backbone)
    root = tmp_path / "split_folder"
    write_image_folder(root / "train", ["green star", "red car"], per_class=3)
    write_image_folder(root / "test", ["red car"], per_class=2)
    (root / "test" / "green star").mkdir()  # the class is known to the test split but has no images there
    with pytest.warns(UserWarning, match="hold no images"), pytest.raises(SystemExit):
        main(["explain", str(run), "--class-images", "green star", "--classes", f"folder:{root}", "--out",
              str(tmp_path / "viewer")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no images of class 'green star' in the test split" in err[0], err
    assert "the train split has 3: pass --split train" in err[0]
    assert not (tmp_path / "viewer").exists()
