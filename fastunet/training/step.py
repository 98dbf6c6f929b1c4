"""One training update (the loop body of ``fastunet.train``), shared with the benchmarks."""
import torch
import torch.nn as nn

__all__ = ["TrainStep", "train_step", "set_fused"]


class TrainStep(nn.Module):
    """The segmentor's losses as ``forward``, so DDP and torch.compile see the whole step."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, labels):
        return self.model.loss(images, labels)


def train_step(step, optimizer, scaler, images, labels, amp_dtype=None):
    """Forward (autocast to ``amp_dtype`` when given), backward, SGD update; returns the losses.

    ``scaler``: a ``torch.amp.GradScaler`` (enabled for fp16 only; a disabled one is a no-op).
    """
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
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
