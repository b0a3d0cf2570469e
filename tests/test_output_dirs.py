"""The one rule for directories a command writes (clm_ext.output_dirs): apart from the inputs, never emptied,
same-named files replaced, clashes refused before anything moves, new directories as the umask allows."""
import os

import pytest

from clm_ext.output_dirs import OutputDirError, check_apart, check_output_dir, staged_into


def _write(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _read(root):
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("relation, out", [("is the", "model"), ("contains the", "."), ("lies inside the", "model/x"),
                                           ("is the", "link")])
def test_an_out_related_to_an_input_is_refused_even_with_force(tmp_path, relation, out):
    (tmp_path / "model").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "model")  # through a symlink: the same directory
    with pytest.raises(OutputDirError, match=f"--out {tmp_path / out} {relation} --model"):
        check_output_dir(str(tmp_path / out), {"--model": str(tmp_path / "model")}, force=True)
    check_apart(str(tmp_path / "model-out"), {"--model": str(tmp_path / "model"), "--data": None,
                                              "--name": "smollm2-135m-instruct"})  # a sibling; non-paths skipped


def test_force_replaces_same_names_and_keeps_everything_else(tmp_path):
    out = tmp_path / "out"
    _write(out, {"important.txt": "mine", "config.json": "old", "sub/old.txt": "mine too", "sub/w.bin": "old"})
    with pytest.raises(OutputDirError, match="non-empty directory; pass --force"):
        check_output_dir(str(out), {}, force=False)
    check_output_dir(str(out), {}, force=True)
    with staged_into(str(out)) as stage:
        assert os.path.dirname(stage) == str(tmp_path)
        _write(tmp_path / os.path.basename(stage), {"config.json": "new", "sub/w.bin": "new", "sub/deeper/x": "new"})
    assert _read(out) == {"important.txt": "mine", "config.json": "new", "sub/old.txt": "mine too", "sub/w.bin": "new",
                          "sub/deeper/x": "new"}
    assert os.listdir(tmp_path) == ["out"]


def test_a_failure_or_a_clash_leaves_the_target_as_it_was(tmp_path):
    out = tmp_path / "out"
    _write(out, {"important.txt": "mine", "weights": "old", "tokenizer/vocab.txt": "old"})
    before = _read(out)
    with pytest.raises(RuntimeError, match="killed"):
        with staged_into(str(out)) as stage:
            _write(tmp_path / os.path.basename(stage), {"weights": "half-written"})
            raise RuntimeError("killed while writing")
    with pytest.raises(OutputDirError, match="tokenizer is a directory"):  # a file over a directory: refused
        with staged_into(str(out)) as stage:
            _write(tmp_path / os.path.basename(stage), {"weights": "new", "tokenizer": "a file"})
    assert _read(out) == before and os.listdir(tmp_path) == ["out"]


def test_a_new_directory_honours_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with staged_into(str(tmp_path / "new")) as stage:
            (tmp_path / os.path.basename(stage) / "f").write_text("x")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "new").st_mode & 0o777 == 0o750
