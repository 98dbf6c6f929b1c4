"""The published optimiser and learning-rate schedule: SGD on all parameters, poly decay.

mmseg's recipe for every UNet-S5-D16 config (its ``schedule_40k``)::

    SGD(lr=0.01, momentum=0.9, weight_decay=5e-4)        # all parameters, BN and biases included
    lr(it) = (0.01 - 1e-4) * (1 - it / 40000) ** 0.9 + 1e-4   for it = 0 .. 39999

``it`` counts completed iterations, so the first update uses the base rate and the rate reaches
``min_lr`` only after the last one.
"""
import torch

__all__ = ["poly_lr", "PolyLR", "build_optimizer", "load_optimizer_state"]


def poly_lr(iteration, max_iters, base_lr=0.01, min_lr=1e-4, power=0.9):
    """mmseg's PolyLR: ``(base_lr - min_lr) * (1 - iteration / max_iters) ** power + min_lr``."""
    if max_iters <= 0:
        raise ValueError(f"max_iters must be positive, got {max_iters}")
    progress = min(max(iteration, 0), max_iters) / max_iters
    return (base_lr - min_lr) * (1.0 - progress) ** power + min_lr


class PolyLR:
    """Sets every parameter group's learning rate to :func:`poly_lr` of the iteration.

    Stateless (a function of the iteration only), so resuming needs nothing but the iteration.
    """

    def __init__(self, optimizer, max_iters, base_lr, min_lr=1e-4, power=0.9):
        self.optimizer, self.max_iters = optimizer, int(max_iters)
        self.base_lr, self.min_lr, self.power = float(base_lr), float(min_lr), float(power)

    def lr_at(self, iteration):
        """The learning rate used by update number ``iteration`` (0-based)."""
        return poly_lr(iteration, self.max_iters, self.base_lr, self.min_lr, self.power)

    def step(self, iteration):
        """Set the rate for update ``iteration`` on all parameter groups; returns it. A rate
        held in a tensor (a captured optimizer's) is filled in place, without a host sync."""
        lr = self.lr_at(iteration)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        return lr


def build_optimizer(model, train_cfg, capturable=False):
    """SGD with the config's lr, momentum and weight decay on all trainable parameters.

    capturable: PyTorch's fused SGD kernel reading the learning rate from a tensor on the
    parameters' device, so that a step never synchronises with the host and can be captured in a
    CUDA graph (the foreach SGD would read a tensor rate with ``.item()``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    lr = float(train_cfg["lr"])
    options = {}
    if capturable:
        options = dict(lr=torch.tensor(lr, device=params[0].device), fused=True)
    return torch.optim.SGD(params, **{"lr": lr, **options},
                           momentum=float(train_cfg.get("momentum", 0.9)),
                           weight_decay=float(train_cfg.get("weight_decay", 5e-4)))


def load_optimizer_state(optimizer, state_dict):
    """``optimizer.load_state_dict`` keeping this run's own kind of step: the saved momentum
    buffers, momentum and weight decay, but the learning-rate holder and the fused/foreach
    choice of ``optimizer`` (a checkpoint of a captured run resumes eagerly, and back)."""
    own = [{k: g[k] for k in ("lr", "fused", "foreach") if k in g}
           for g in optimizer.param_groups]
    optimizer.load_state_dict(state_dict)
    for group, options in zip(optimizer.param_groups, own):
        group.update(options)
