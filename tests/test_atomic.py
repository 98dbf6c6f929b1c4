"""fastunet.atomic: complete or absent, the umask respected, a full disk named, one temporary-name
scheme and the clean-up of what killed writers left."""
import errno
import os
import stat
import subprocess
import sys

import pytest

from fastunet.atomic import (DiskFullError, atomic_copy, atomic_directory, atomic_path,
                             atomic_write, remove_stale_temp_files, temp_path)


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.txt"
    with atomic_write(path, "w") as f:
        f.write("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_write(path, "w") as f:
            f.write("new, half")
            1 / 0
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_a_writer_given_a_name_replaces_the_file_only_when_it_succeeds(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("the exporter failed")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.onnx"]
    with atomic_path(path) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and not os.path.exists(tmp)
        open(tmp, "wb").write(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["model.onnx"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_and_folders_respect_the_umask(umask, tmp_path):
    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "f.bin") as f:
            f.write(b"x")
        with atomic_directory(tmp_path / "d") as d:
            open(os.path.join(d, "x"), "w").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f.bin").st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o777 & ~umask


def test_no_space_becomes_disk_full_error_naming_the_target(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError) as info:
        with atomic_write(tmp_path / "out.png") as f:
            f.write(b"data")
    assert str(info.value) == f"{tmp_path / 'out.png'}: disk full (no space left on device)"
    assert info.value.errno == errno.ENOSPC and os.listdir(tmp_path) == []


def test_a_copy_is_a_file_of_its_own(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 3_000_000)
    atomic_copy(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == (tmp_path / "a").read_bytes()
    assert os.stat(tmp_path / "a").st_nlink == os.stat(tmp_path / "b").st_nlink == 1


def test_a_directory_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "root"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as d:
            open(os.path.join(d, "half"), "w").close()
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(FileExistsError):
        with atomic_directory(target):
            pass
    with atomic_directory(target, replace=True) as d:
        open(os.path.join(d, "new"), "w").close()
    assert os.listdir(target) == ["new"] and os.listdir(tmp_path) == ["root"]


def test_only_the_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = _dead_pid()
    mine = temp_path(tmp_path / "sub" / "live.png")
    os.makedirs(os.path.dirname(mine))
    left = os.path.join(tmp_path, "sub", f".x.png.{dead}.0123abcd.tmp")
    left_dir = os.path.join(tmp_path, f".DRIVE.{dead}.89abcdef.tmp")
    for p in (mine, left, tmp_path / "keep.tmp", tmp_path / f".y.{dead}.tmp"):
        open(p, "w").close()
    os.mkdir(left_dir)
    open(os.path.join(left_dir, "image.png"), "w").close()
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted([left, left_dir])
    assert os.path.exists(mine) and (tmp_path / "keep.tmp").exists()
    assert (tmp_path / f".y.{dead}.tmp").exists()  # not the scheme's name: not ours


def test_an_append_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    from fastunet.training.log import RunLog

    log = RunLog(str(tmp_path), 10, progress=False)
    real_open = open

    def full_open(path, mode="r", *args, **kw):
        if str(path).endswith("log.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kw)
    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(DiskFullError, match="log.jsonl: disk full"):
        log.event(0, event="start")
