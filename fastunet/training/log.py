"""What a run reports: a progress bar (or plain lines), ``log.jsonl``, curves PNG, TensorBoard.

Only rank 0 reports. On a terminal a tqdm bar shows iteration, it/s, ETA, loss and lr; when
stderr is not a terminal (a log file, CI) the same figures are printed as one plain line every
``log_interval`` iterations. Every logged iteration and evaluation is also appended to
``work_dir/log.jsonl`` (one JSON object per line, flushed) and, when ``torch.utils.tensorboard``
is importable, written as TensorBoard scalars under ``work_dir/tensorboard``.
"""
import json
import math
import os
import sys
import time

from .curves import draw_curves

__all__ = ["RunLog", "format_duration", "read_jsonl"]


def format_duration(seconds):
    """Seconds as H:MM:SS (or M:SS)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def read_jsonl(path):
    """The records of a JSON-lines file (a torn last line from a killed run is skipped)."""
    out = []
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


def _tensorboard(log_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: optional
        return None
    return SummaryWriter(log_dir)


class RunLog:
    """Progress, JSON lines, curves and TensorBoard of one run (all inert when not ``enabled``).

    start_iter > 0 (a resumed run) keeps the log.jsonl records up to start_iter and drops the
    ones after it (written by the interrupted run after its last checkpoint).
    """

    def __init__(self, work_dir, max_iters, start_iter=0, log_interval=50, enabled=True,
                 stream=None, progress=None):
        self.enabled, self.work_dir = enabled, work_dir
        self.max_iters, self.start_iter = int(max_iters), int(start_iter)
        self.log_interval = max(1, int(log_interval))
        self.stream = stream or sys.stdout
        self.jsonl_path = os.path.join(work_dir, "log.jsonl")
        self.curves_path = os.path.join(work_dir, "curves.png")
        self.records, self._bar, self._tb = [], None, None
        self._t0 = self._t_last = time.perf_counter()
        self._it_last = self.start_iter
        if not enabled:
            return
        os.makedirs(work_dir, exist_ok=True)
        self.records = [r for r in read_jsonl(self.jsonl_path)
                        if r.get("iter", 0) <= self.start_iter] if start_iter else []
        self._rewrite()
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=self.max_iters, initial=self.start_iter, unit="it",
                             dynamic_ncols=True, file=sys.stderr, smoothing=0.05)
        self._tb = _tensorboard(os.path.join(work_dir, "tensorboard"))

    def _rewrite(self):
        from ..atomic import atomic_write

        with atomic_write(self.jsonl_path, "w") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")

    def _append(self, record):
        from ..atomic import raise_if_disk_full

        self.records.append(record)
        try:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise_if_disk_full(e, self.jsonl_path)
            raise

    def print(self, text):
        """A message that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=self.stream, flush=True)

    def advance(self, iteration):
        """Count iteration ``iteration`` (1-based number of updates done) on the bar."""
        if self._bar is not None:
            self._bar.update(iteration - self._bar.n)

    def train(self, iteration, losses, lr, extra=None):
        """Log the losses (name -> float) and lr after ``iteration`` updates."""
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = (iteration - self._it_last) / max(now - self._t_last, 1e-9)
        self._t_last, self._it_last = now, iteration
        total = sum(losses.values())
        record = {"mode": "train", "iter": iteration, "loss": total, **losses, "lr": lr,
                  "it_per_s": rate, "time": time.time(), **(extra or {})}
        self._append(record)
        if self._tb is not None:
            for k, v in losses.items():
                self._tb.add_scalar(f"train/{k}", v, iteration)
            self._tb.add_scalar("train/loss", total, iteration)
            self._tb.add_scalar("train/lr", lr, iteration)
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {total:.4f} lr {lr:.2e}", refresh=False)
            self.advance(iteration)
        else:
            eta = (self.max_iters - iteration) / rate if rate > 0 else None
            terms = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
            mem = f"  mem {extra['memory_gb']:.2f} GB" if extra and "memory_gb" in extra else ""
            self.print(f"iter {iteration}/{self.max_iters}  loss {total:.4f} ({terms})  "
                       f"lr {lr:.3e}  {rate:.2f} it/s  ETA {format_duration(eta)}{mem}")

    def val(self, iteration, metrics, seconds=None):
        """Log evaluation metrics (SegMetric.compute() values) after ``iteration`` updates."""
        if not self.enabled:
            return
        record = {"mode": "val", "iter": iteration, **{k: v for k, v in metrics.items()},
                  "time": time.time()}
        if seconds is not None:
            record["seconds"] = seconds
        self._append(record)
        if self._tb is not None:
            for k in ("vessel_dice", "mDice", "mIoU", "aAcc"):
                if k in metrics:
                    self._tb.add_scalar(f"val/{k}", metrics[k], iteration)
        self.draw()

    def event(self, iteration, **fields):
        """A free-form record (start, resume, stop) in log.jsonl."""
        if self.enabled:
            self._append({"mode": "event", "iter": iteration, **fields, "time": time.time()})

    def draw(self):
        """Redraw curves.png from the records so far."""
        if self.enabled:
            draw_curves(self.records, self.curves_path, self.max_iters)
        return self.curves_path

    def close(self):
        """Finish the bar, draw the curves, flush TensorBoard."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.draw()
        if self._tb is not None:
            self._tb.close()
