"""jaxkv create-tiny: --overwrite replaces a checkpoint, never somebody's other files."""

from jaxkv.checkpoints import load_checkpoint
from jaxkv.cli import main


def test_overwrite_refuses_a_folder_with_other_files(tmp_path, capsys):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    assert main(["create-tiny", str(folder), "--overwrite"]) == 2
    assert "'thesis.tex', which is not a checkpoint file" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]
    assert (folder / "thesis.tex").read_text() == "years of work"


def test_overwrite_replaces_a_checkpoint(tmp_path):
    assert main(["create-tiny", str(tmp_path / "t"), "--seed", "1"]) == 0
    _, p1 = load_checkpoint(tmp_path / "t")
    assert main(["create-tiny", str(tmp_path / "t"), "--seed", "2", "--overwrite"]) == 0
    _, p2 = load_checkpoint(tmp_path / "t")
    assert (p1["norm"]["weight"] == p2["norm"]["weight"]).all()  # ones either way
    assert not (p1["embed"]["embedding"] == p2["embed"]["embedding"]).all()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_a_huge_seed_is_one_line(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["create-tiny", str(tmp_path / "t"), "--seed", str(2**80)])
    assert e.value.code == 2 and "a seed must be in [0, 2**32)" in capsys.readouterr().err
