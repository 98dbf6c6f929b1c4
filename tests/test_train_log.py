"""Run reporting: plain log lines off a terminal, log.jsonl (resume-aware), curves, TensorBoard."""
import io
import json

import numpy as np
from PIL import Image

from fastunet.training import log as runlog


class FakeWriter:
    def __init__(self):
        self.scalars, self.closed = [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_plain_lines_jsonl_curves_and_tensorboard(tmp_path, monkeypatch):
    writer = FakeWriter()
    monkeypatch.setattr(runlog, "_tensorboard", lambda d: writer)
    out = io.StringIO()
    log = runlog.RunLog(tmp_path, 100, log_interval=10, stream=out, progress=False)
    log.train(10, {"decode.loss_ce": 0.5, "aux.loss_ce": 0.2}, 0.01)
    log.val(10, {"vessel_dice": 60.0, "mDice": 70.0, "mIoU": 65.0, "aAcc": 90.0})
    log.close()
    line = out.getvalue().splitlines()[0]
    for part in ("iter 10/100", "loss 0.7000", "decode.loss_ce 0.5000", "lr 1.000e-02", "it/s",
                 "ETA"):
        assert part in line
    records = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in records] == ["train", "val"]
    assert records[0]["loss"] == 0.7 and records[1]["vessel_dice"] == 60.0
    assert ("train/loss", 0.7, 10) in writer.scalars
    assert ("val/vessel_dice", 60.0, 10) in writer.scalars and writer.closed
    png = np.asarray(Image.open(tmp_path / "curves.png"))
    assert png.ndim == 3 and png.shape[1] > 3 * png.shape[0]  # three panels side by side
    assert (png != 255).any()


def test_resumed_log_drops_what_the_killed_run_wrote_after_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(runlog, "_tensorboard", lambda d: None)
    log = runlog.RunLog(tmp_path, 100, progress=False, stream=io.StringIO())
    for it in (10, 20, 30):
        log.train(it, {"decode.loss_ce": 1.0}, 0.01)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"mode": "train", "it')  # torn line of a killed process
    resumed = runlog.RunLog(tmp_path, 100, start_iter=20, progress=False, stream=io.StringIO())
    resumed.train(30, {"decode.loss_ce": 0.9}, 0.01)
    iters = [json.loads(l)["iter"] for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert iters == [10, 20, 30]


def test_disabled_log_writes_nothing(tmp_path):
    log = runlog.RunLog(tmp_path / "w", 10, enabled=False)
    log.train(1, {"a": 1.0}, 0.1)
    log.val(1, {"vessel_dice": 1.0})
    log.close()
    assert not (tmp_path / "w").exists()


def test_format_duration():
    assert runlog.format_duration(59.6) == "1:00"
    assert runlog.format_duration(3725) == "1:02:05"
    assert runlog.format_duration(float("inf")) == "?"


def test_curves_panels_keep_their_labels_and_few_dice_points_show(tmp_path):
    from fastunet.training import curves

    records = [{"mode": "train", "iter": it, "loss": 1 / it, "lr": 0.01 * (1 - it / 1600)}
               for it in range(50, 1501, 50)]
    records += [{"mode": "val", "iter": 750, "vessel_dice": 70.0, "mDice": 80.0},
                {"mode": "val", "iter": 1500, "vessel_dice": 75.0, "mDice": 85.0}]
    curves.draw_curves(records, tmp_path / "c.png", 1500)
    png = np.asarray(Image.open(tmp_path / "c.png"))
    w, gap = curves._W, curves._GAP
    assert png.shape[1] == 3 * w + 2 * gap
    for i in (1, 2):  # blank gaps: no tick label of a panel stands against its neighbour's frame
        assert (png[:, i * w + (i - 1) * gap:i * (w + gap)] == 255).all()
    # each panel has a y-axis label, left of its tick labels
    for i in range(3):
        assert (png[:, i * (w + gap):i * (w + gap) + 16] != 255).any()
    # the Dice panel's two points are large markers: a tall run of the vessel colour in the
    # column of the first point (a bare 2-pixel line would give a run of about 2-3)
    dice = png[:, 2 * (w + gap):]
    x = round(curves._L + (w - curves._R - curves._L) * 750 / 1500)
    column = np.all(dice[curves._T:, x] == curves._COLORS[0], axis=-1)
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, column.astype(int), 0])))[::2]
    assert runs.max() >= 7
