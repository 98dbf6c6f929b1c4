"""Nothing lost, nothing half-written: predict and convert killed (SIGKILL) at random moments leave
only complete outputs (and clearly named temporary files, which the next run removes); a rerun
completes the job. predict never overwrites or re-reads an input, whatever --out-dir is; a full
disk stops a run with one line and the previous files intact; messages name the files that
really hold the last good state."""
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fastunet
from fastunet.data.converters import MANIFEST
from fastunet.data.io import read_image, read_label, write_png
from fastunet.models import save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLS = 3
IMAGES = 16


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1")


def kill_at_random(argv, first_output, rng, max_delay):
    """Start ``python -m argv``, wait until ``first_output()`` is true (work has begun) or the
    process ends, then SIGKILL it after a random delay. Returns whether it was killed."""
    proc = subprocess.Popen([sys.executable, "-m"] + argv, env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while proc.poll() is None and not first_output() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, max_delay))
        if proc.poll() is not None:
            return False
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------ predict

@pytest.fixture(scope="module")
def predict_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict_kill")
    torch.manual_seed(0)
    ckpt = save_checkpoint(d / "tiny.pth", fastunet.build_segmentor(fastunet.get_config(
        "synthetic")))
    rng = np.random.default_rng(0)
    images = d / "images"
    images.mkdir()
    for i in range(IMAGES):
        write_png(images / f"img{i}.png", rng.integers(0, 256, (300, 340, 3), dtype=np.uint8))
    return ckpt, images


def _complete_outputs(out):
    return out.is_dir() and sum(not n.startswith(".") for n in os.listdir(out))


def _check_outputs(out, images, complete):
    """Every output present is a complete PNG of the right size; temporary files are hidden
    and clearly named; with ``complete``, all outputs exist and no temporary file is left."""
    names = sorted(os.listdir(out)) if os.path.isdir(out) else []
    temps = [n for n in names if n.startswith(".")]
    assert all(n.endswith(".tmp") for n in temps), temps
    done = [n for n in names if not n.startswith(".")]
    for name in done:
        stem, kind = name.rsplit("_", 1)
        assert kind in ("mask.png", "overlay.png", "prob.png"), name
        arr = read_label(out / name) if kind != "overlay.png" else read_image(out / name)
        assert arr.shape[:2] == (300, 340), name
    if complete:
        expected = sorted(f"img{i}_{k}.png" for i in range(IMAGES) for k in ("mask", "overlay", "prob"))
        assert done == expected and temps == []
    return len(done)


def test_predict_killed_leaves_only_complete_files(predict_inputs, tmp_path):
    ckpt, images = predict_inputs
    out = tmp_path / "out"
    argv = ["fastunet.predict", str(images), "--config", "synthetic", "--checkpoint", str(ckpt),
            "--out-dir", str(out), "--save-probs", "--device", "cpu", "--quiet"]
    rng = random.Random(1234)
    counts = []
    # the first kill comes as soon as one output is complete (a fast machine may finish all the
    # images within any fixed delay), the others at random moments
    for max_delay in [0.0] + [0.5] * (KILLS - 1):
        killed = kill_at_random(argv, lambda: _complete_outputs(out) > 0, rng, max_delay)
        counts.append((killed, _check_outputs(out, images, complete=not killed)))
    assert any(killed and 0 < n < 3 * IMAGES for killed, n in counts), counts  # killed mid-way
    # a rerun finishes the job and removes the temporary files of the killed runs
    (out / ".img0_mask.png.999999999.0123abcd.tmp").write_bytes(b"\x89PNG partial")
    proc = subprocess.run([sys.executable, "-m"] + argv, env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _check_outputs(out, images, complete=True)


# ------------------------------------------------------------------------------ convert

@pytest.fixture(scope="module")
def drive_zips(tmp_path_factory):
    import test_convert

    d = tmp_path_factory.mktemp("convert_kill")
    test_convert.H, test_convert.W = 200, 180  # big enough to take a moment to convert
    try:
        return test_convert.drive_archives(d)
    finally:
        test_convert.H, test_convert.W = 12, 10


def _root_complete(root):
    manifest = json.load(open(root / MANIFEST))
    on_disk = {os.path.relpath(os.path.join(r, f), root) for r, _, fs in os.walk(root)
               for f in fs} - {MANIFEST}
    assert on_disk == set(manifest["files"])
    assert manifest["counts"] == {"training": 20, "validation": 20}
    for rel in manifest["files"]:
        (read_image if rel.startswith("images") else read_label)(root / rel)


def test_convert_killed_leaves_no_partial_root(drive_zips, tmp_path):
    out = tmp_path / "DRIVE"
    argv = ["fastunet.convert", "drive", *drive_zips, "-o", str(out), "-q"]
    rng = random.Random(99)
    temp = lambda n: n.startswith(".DRIVE.") and n.endswith(".tmp")
    started = lambda: any(temp(n) for n in os.listdir(tmp_path))
    kills = 0
    for _ in range(KILLS):
        killed = kill_at_random(argv, started, rng, 0.8)
        kills += killed
        if killed:
            assert not out.exists() or (out / MANIFEST).exists()
        if out.exists():  # the rename is the last step: a root that exists is complete
            _root_complete(out)
        leftovers = [n for n in os.listdir(tmp_path) if n != "DRIVE"]
        assert all(temp(n) for n in leftovers), leftovers
    assert kills  # at least one run was killed before it finished
    proc = subprocess.run([sys.executable, "-m"] + argv, env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _root_complete(out)
    assert os.listdir(tmp_path) == ["DRIVE"]  # the killed runs' temporary roots are gone


# ------------------------------------------------------------------------------ train

TRAIN_ITERS = 90
TRAIN_KILLS = int(os.environ.get("FASTUNET_TRAIN_KILLS", "5"))


def _train_args(work):
    from trainkit import intervals, tiny_model, tiny_synthetic

    # dropout is on, so random states matter; a checkpoint every 7 iterations, one evaluation
    return ["--max-iters", str(TRAIN_ITERS), "--batch-size", "2", "--workers", "0",
            "--log-interval", "1", "--seed", "5", "--work-dir", str(work), "--cfg-options",
            *tiny_model(2), *tiny_synthetic(num_train=3, num_val=1), *intervals(7),
            f"train.eval_interval={TRAIN_ITERS}"]


def test_train_killed_at_random_moments_resumes_to_the_same_weights(tmp_path):
    from fastunet.training.state import load_training_checkpoint
    from trainkit import assert_same_run, cli_env

    cache = tmp_path / "cache"
    env = cli_env(cache)

    def run(work, resume, timeout=600):
        args = _train_args(work) + (["--resume"] if resume else [])
        return subprocess.Popen([sys.executable, "-m", "fastunet.train", *args], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)

    t0 = time.time()
    whole = run(tmp_path / "whole", False)
    assert whole.wait(timeout=600) == 0, whole.stderr.read()
    whole.stderr.close()
    duration = time.time() - t0

    work = tmp_path / "killed"
    rng = random.Random(2024)
    model = fastunet.build_segmentor(fastunet.models.apply_overrides(
        fastunet.get_config("synthetic"), _train_args(work)[_train_args(work).index(
            "--cfg-options") + 1:]))
    seen, kills = [], 0
    for _ in range(TRAIN_KILLS):
        latest = work / "latest.pth"
        proc = run(work, resume=latest.exists())
        try:
            proc.wait(timeout=rng.uniform(0.3, duration))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            kills += 1
        finally:
            proc.stderr.close()
        if latest.exists():  # always loadable: weights, and the full training state
            ckpt = load_training_checkpoint(latest)
            seen.append(ckpt["meta"]["iteration"])
            fastunet.load_checkpoint(model, latest)
        temps = [n for n in os.listdir(work) if n.startswith(".")] if work.exists() else []
        assert all(n.endswith((".pth", ".tmp")) for n in temps), temps  # hidden, named so
    assert kills >= 2, "the random delays killed fewer than 2 runs"
    final = run(work, resume=(work / "latest.pth").exists())
    assert final.wait(timeout=600) == 0, final.stderr.read()
    final.stderr.close()
    assert not [n for n in os.listdir(work) if n.startswith(".")]  # leftovers removed
    a = torch.load(tmp_path / "whole" / "latest.pth", weights_only=False)
    b = torch.load(work / "latest.pth", weights_only=False)
    assert_same_run(a, b, TRAIN_ITERS)
    assert seen == sorted(seen)  # checkpoints only move forward


# ------------------------------------------------------------------------------ predict: inputs

def _hashes(folder):
    return {os.path.relpath(os.path.join(r, f), folder):
            hashlib.sha256(open(os.path.join(r, f), "rb").read()).hexdigest()
            for r, _, fs in os.walk(folder) for f in fs}


def _predict(argv, capsys):
    from fastunet import predict

    code = predict.main(argv + ["--config", "synthetic", "--device", "cpu", "--quiet"])
    return code, capsys.readouterr().err


def test_predict_into_its_own_input_folder_changes_no_input_byte(predict_inputs, tmp_path,
                                                                 capsys):
    ckpt, images = predict_inputs
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        shutil.copy(images / f"img{i}.png", folder)
    # a mask of the user's own beside its image, named as predict names its outputs
    write_png(folder / "img0_mask.png", np.eye(300, 340, dtype=np.uint8) * 255)
    before = _hashes(folder)
    argv = [str(folder), "--checkpoint", str(ckpt), "--out-dir", str(folder)]
    code, err = _predict(argv, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and "would replace the input image" in err, err
    assert _hashes(folder) == before  # not a byte changed, nothing written

    os.remove(folder / "img0_mask.png")
    inputs = _hashes(folder)
    for run in range(2):  # outputs beside the inputs; the second run neither re-reads them
        code, err = _predict(argv, capsys)  # as inputs nor multiplies them
        assert code == 0, err
        assert "wrote 3 of 3 images" in err, err
        assert ("6 file(s) this command wrote earlier" in err) == (run == 1), err
        now = _hashes(folder)
        assert len(now) == 9 and {k: now[k] for k in inputs} == inputs


def test_predict_same_names_in_different_folders_are_all_written(predict_inputs, tmp_path,
                                                                 capsys):
    ckpt, images = predict_inputs
    for sub, i in (("a", 0), ("b", 1)):
        (tmp_path / sub).mkdir()
        shutil.copy(images / f"img{i}.png", tmp_path / sub / "x.png")
    for inputs in ([tmp_path / "a", tmp_path / "b"],
                   [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"]):
        out = tmp_path / f"out{len(os.listdir(tmp_path))}"
        code, err = _predict([*map(str, inputs), "--checkpoint", str(ckpt), "--out-dir",
                              str(out), "--no-overlay"], capsys)
        assert code == 0 and "wrote 2 of 2 images" in err, err
        assert sorted(_hashes(out)) == [os.path.join("a", "x_mask.png"),
                                        os.path.join("b", "x_mask.png")]
        assert read_label(out / "a" / "x_mask.png").shape == (300, 340)


# ------------------------------------------------------------------------------ a full disk

@pytest.fixture(params=["tmpfs", "patched"])
def full_disk(request, tmp_path, monkeypatch):
    """(folder, fill): fill(leave_bytes, only) makes writes to ``folder`` fail for lack of space.

    tmpfs: a real 1 MiB tmpfs (needs mount rights, else skipped) filled up to ``leave_bytes``;
    patched: a normal folder where fsync, which reports a full disk on delayed-allocation
    filesystems, fails with ENOSPC for files whose name contains ``only`` (all if None)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if request.param == "tmpfs":
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                                 capture_output=True)
        if mounted.returncode:
            pytest.skip("cannot mount a tmpfs here (not root)")
        request.addfinalizer(lambda: subprocess.run(["umount", str(folder)]))

        def fill(leave_bytes=0, only=None):
            with open(folder / "filler", "wb") as f:
                try:
                    while True:
                        st = os.statvfs(folder)
                        room = st.f_bavail * st.f_frsize - leave_bytes
                        if room <= 0:
                            break
                        f.write(bytes(min(room, 1 << 16)))
                        f.flush()
                except OSError as e:
                    assert e.errno == errno.ENOSPC
    else:
        fill = _patched_fill(monkeypatch)
    return folder, fill


def _patched_fill(monkeypatch):
    """fill(leave_bytes, only): fsync fails with ENOSPC for files whose name contains ``only``."""
    real_fsync = os.fsync

    def fill(leave_bytes=0, only=None):
        def fsync(fd):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if stat.S_ISREG(os.fstat(fd).st_mode) and (only is None or only in target):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)
        monkeypatch.setattr(os, "fsync", fsync)
    return fill


def _no_temp_files(folder):
    return [n for _, _, fs in os.walk(folder) for n in fs if n.startswith(".")] == []


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(full_disk):
    from fastunet.atomic import DiskFullError
    from fastunet.models.checkpoint import read_checkpoint

    folder, fill = full_disk
    model = fastunet.build_segmentor(fastunet.get_config("synthetic"))
    path = save_checkpoint(folder / "ckpt.pth", {"w": torch.ones(4)}, meta={"iteration": 1})
    fill()
    with pytest.raises(DiskFullError) as info:
        save_checkpoint(path, model, meta={"iteration": 2})
    assert str(info.value) == f"{path}: disk full (no space left on device)"
    assert read_checkpoint(path)["meta"]["iteration"] == 1
    assert _no_temp_files(folder)


def test_disk_full_while_writing_an_overlay_stops_predict_in_one_line(full_disk, predict_inputs,
                                                                      capsys):
    ckpt, images = predict_inputs
    folder, fill = full_disk
    fill(leave_bytes=96 << 10, only="_overlay.png")  # room for a mask, not for an overlay
    code, err = _predict([str(images), "--checkpoint", str(ckpt), "--out-dir", str(folder)],
                         capsys)
    assert code == 1 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert f"{folder / 'img0_overlay.png'}: disk full (no space left on device)" in err, err
    assert _no_temp_files(folder)
    assert read_label(folder / "img0_mask.png").shape == (300, 340)  # complete


def test_disk_full_while_training_ends_in_one_line_with_the_last_checkpoint_intact(
        tmp_path, monkeypatch, capsys):
    from fastunet import train as train_cli
    from fastunet.training.state import load_training_checkpoint
    from trainkit import intervals, tiny_model, tiny_synthetic

    folder = tmp_path / "work"  # the patched disk only: what fits in a small tmpfs varies
    _patched_fill(monkeypatch)(only="iter_2.pth")
    monkeypatch.setenv("FASTUNET_CACHE", str(tmp_path / "cache"))
    code = train_cli.main(["--max-iters", "3", "--batch-size", "2", "--workers", "0",
                           "--work-dir", str(folder), "--cfg-options", *tiny_model(2),
                           *tiny_synthetic(), *intervals(1)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{folder / 'iter_2.pth'}: disk full" in err and "--resume" in err, err
    assert load_training_checkpoint(folder / "latest.pth")["meta"]["iteration"] == 1
    assert _no_temp_files(folder)


# ------------------------------------------------------------------------------ what messages name

@pytest.fixture()
def finished_run(tmp_path, monkeypatch):
    """A 2-iteration training run in tmp/A with checkpoints at iterations 1 and 2 (umask 022)."""
    from fastunet import train as train_cli
    from trainkit import intervals, tiny_model, tiny_synthetic

    monkeypatch.setenv("FASTUNET_CACHE", str(tmp_path / "cache"))
    opts = ["--cfg-options", *tiny_model(2), *tiny_synthetic()]
    old = os.umask(0o022)
    try:
        assert train_cli.main(["--max-iters", "2", "--batch-size", "2", "--workers", "0",
                               "--work-dir", str(tmp_path / "A"), *opts, *intervals(1)]) == 0
    finally:
        os.umask(old)
    return tmp_path / "A", opts


def test_checkpoints_are_files_of_their_own_with_the_umask(finished_run):
    work, _ = finished_run
    for name in ("iter_1.pth", "iter_2.pth", "latest.pth"):
        st = os.stat(work / name)
        assert st.st_nlink == 1, name  # latest.pth is no hard link sharing damage with iter_2
        assert stat.S_IMODE(st.st_mode) == 0o644, (name, oct(st.st_mode))


def test_a_truncated_latest_points_to_the_intact_checkpoint_beside_it(finished_run, capsys):
    from fastunet import train as train_cli

    work, opts = finished_run
    data = (work / "latest.pth").read_bytes()
    with open(work / "latest.pth", "r+b") as f:
        f.truncate(len(data) // 2)
    code = train_cli.main(["--max-iters", "4", "--batch-size", "2", "--workers", "0",
                           "--work-dir", str(work), "--resume", *opts])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "truncated or corrupt" in err, err
    assert f"{work / 'iter_2.pth'} beside it is intact: continue with --resume " \
           f"{work / 'iter_2.pth'}" in err, err


def test_after_a_resume_from_elsewhere_messages_name_the_real_last_checkpoint(
        finished_run, tmp_path, monkeypatch, capsys):
    from fastunet import train as train_cli
    from trainkit import intervals

    work, opts = finished_run
    source = work / "iter_2.pth"
    # a finished run resumed into a new work dir: it only evaluates; its checkpoint is the source
    assert train_cli.main(["--max-iters", "2", "--batch-size", "2", "--workers", "0",
                           "--work-dir", str(tmp_path / "B"), "--resume", str(source),
                           *opts]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {source}" in out, out
    # a NaN loss before the first new checkpoint: the last good one is the source, outside B
    real = train_cli.TrainStep.forward

    def poisoned(self, images, labels):
        losses = real(self, images, labels)
        losses["decode.loss_ce"] = losses["decode.loss_ce"] * float("nan")
        return losses

    monkeypatch.setattr(train_cli.TrainStep, "forward", poisoned)
    code = train_cli.main(["--max-iters", "6", "--batch-size", "2", "--workers", "0",
                           "--work-dir", str(tmp_path / "C"), "--resume", str(source), *opts,
                           *intervals(4)])
    err = capsys.readouterr().err
    assert code == 1 and "non-finite at iteration 3" in err, err
    assert f"The last good checkpoint is {source} (iteration 2)" in err, err
    assert err.strip().endswith(f"continue with --resume {source}"), err
