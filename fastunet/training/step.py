"""One training update (the loop body of ``fastunet.train``), eager or replayed from a CUDA graph.

An update is forward (under autocast when asked), losses, backward and the optimizer step. It
never synchronises with the host: no ``.item()``, no data-dependent shapes, the learning rate read
from the optimizer (a device tensor when captured). So the host can queue the next batch while the
device works, and the whole update can be captured once in a CUDA graph and replayed (one launch
instead of hundreds: a 64x64 UNet step is launch-bound on a large GPU). The loop looks at the losses
only every few iterations (``LossTracker``), outside the update.
"""
import contextlib

import torch
import torch.nn as nn

__all__ = ["TrainStep", "train_step", "set_fused", "Update", "GraphedUpdate", "LossTracker"]


class TrainStep(nn.Module):
    """The segmentor's losses as ``forward``, so DDP and torch.compile see the whole step."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, labels):
        return self.model.loss(images, labels)


def train_step(step, optimizer, scaler, images, labels, amp_dtype=None, cache_casts=True):
    """Forward (autocast to ``amp_dtype`` when given), backward, optimizer step; returns the
    losses (name -> 0-dim tensor).

    ``scaler``: a ``torch.amp.GradScaler`` (enabled for fp16 only; a disabled one is a no-op).
    ``cache_casts=False``: autocast keeps no cast weights between uses (CUDA graph capture).
    """
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None, cache_enabled=cache_casts):
        losses = step(images, labels)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return losses


def set_fused(model, fused):
    """Set ``fused`` (None = default, False = plain modules) on every ConvBNReLU block."""
    from ..nn import ConvBNReLU

    for m in model.modules():
        if isinstance(m, ConvBNReLU):
            m.fused = fused
    return model


class Update:
    """``update(images, labels)``: one training update; returns the loss terms as one float32
    vector on the device, in the order of ``update.names`` (known after the first call)."""

    def __init__(self, step, optimizer, scaler=None, amp_dtype=None):
        self.step, self.optimizer, self.amp_dtype = step, optimizer, amp_dtype
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(enabled=False)
        self.names = None

    def __call__(self, images, labels):
        return self._update(images, labels)

    def _update(self, images, labels, cache_casts=True):
        losses = train_step(self.step, self.optimizer, self.scaler, images, labels,
                            self.amp_dtype, cache_casts)
        self.names = tuple(losses)
        return torch.stack([v.detach().float() for v in losses.values()])


class GraphedUpdate(Update):
    """The same update, captured once in a CUDA graph and replayed for every later batch.

    The first ``warmup`` calls run eagerly on a side stream (cuDNN autotuning, the optimizer's
    momentum buffers); the next one copies its batch into input buffers of fixed shape, captures
    the update reading them, and replays it; every later call copies its batch there and replays.
    The results equal the eager update's up to the kernels' own rounding. Needs: fixed batch
    shapes (the loader drops a last partial batch), an optimizer that reads its learning rate from
    a device tensor without synchronising (``build_optimizer(..., capturable=True)``, whose lr
    ``PolyLR`` fills in place), no GradScaler (fp16), one process.
    """

    def __init__(self, step, optimizer, amp_dtype=None, warmup=3):
        super().__init__(step, optimizer, None, amp_dtype)
        if warmup < 1:
            raise ValueError("GraphedUpdate needs at least one eager warm-up update (it creates "
                             "the optimizer's momentum buffers)")
        self.warmup = int(warmup)
        self.calls = 0
        self.graph = None
        self._images = self._labels = self._out = self._stream = None

    def __call__(self, images, labels):
        self.calls += 1
        if self.calls <= self.warmup:
            with self._side_stream():
                return self._update(images, labels)
        if self.graph is None:
            self._images = images.clone(memory_format=torch.preserve_format)
            self._labels = labels.clone()
            self._out = torch.empty(len(self.names), device=images.device)
            self.optimizer.zero_grad(set_to_none=True)  # gradients are allocated in the graph
            self.graph = self._capture(self._replayed)
        else:
            self._images.copy_(images, non_blocking=True)
            self._labels.copy_(labels, non_blocking=True)
        self.graph.replay()
        return self._out

    def _replayed(self):
        """What the graph holds: the update on the input buffers, losses into the output one."""
        self._out.copy_(self._update(self._images, self._labels, cache_casts=False))

    def _side_stream(self):
        if not next(self.step.parameters()).is_cuda:
            return contextlib.nullcontext()
        if self._stream is None:  # one stream for all warm-ups: its memory pool is reused
            self._stream = torch.cuda.Stream()
        return _side_stream(self._stream)

    def _capture(self, body):
        """A CUDA graph of ``body()`` (its kernels are recorded on a capture stream, not run)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        return graph


@contextlib.contextmanager
def _side_stream(side):
    """Run the block on CUDA stream ``side``, ordered after the current stream's work and
    before what follows: eager warm-up before a capture must not run on the default stream."""
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream().wait_stream(side)


class LossTracker:
    """Sums of the loss vectors between log lines, and the first iteration whose losses were not
    finite, kept on the device: the host reads them only when it logs or checks."""

    def __init__(self, max_iters, device):
        self.max_iters = int(max_iters)
        self.first_bad = torch.full((), self.max_iters + 1, dtype=torch.int64, device=device)
        self.sums, self.last, self.count = None, None, 0

    def add(self, losses, iteration):
        """Record the loss vector of update ``iteration`` (0-based)."""
        # the earliest bad iteration wins; a finite update proposes "none" (max_iters + 1)
        self.first_bad = torch.minimum(self.first_bad, torch.where(
            torch.isfinite(losses).all(), self.max_iters + 1, iteration + 1))
        self.sums = losses.clone() if self.sums is None else self.sums + losses
        self.last, self.count = losses, self.count + 1

    def take_means(self, reduce_sum=None, world_size=1):
        """The mean of each loss since the last call, over iterations and processes
        (``reduce_sum`` sums a tensor over them); starts the next sums."""
        sums = self.sums if reduce_sum is None else reduce_sum(self.sums.clone())
        means = [v / self.count for v in (sums / world_size).tolist()]
        self.sums, self.count = None, 0
        return means
