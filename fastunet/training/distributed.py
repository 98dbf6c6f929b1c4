"""Process groups for ``torchrun``, the sharded endless sampler, and small collective helpers.

``torchrun --nproc_per_node=N -m fastunet.train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK;
:func:`init` reads them and starts NCCL on CUDA (one GPU per local rank) or gloo on CPU. Without
them everything here degrades to a single process (rank 0 of 1) and the collectives are no-ops.
"""
import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init", "shutdown", "ShardedSampler", "barrier", "all_reduce_sum", "all_reduce_min",
           "all_gather_object", "broadcast_object"]


class DistInfo:
    """rank, world_size, local_rank and device of this process; ``is_main`` for rank 0."""

    def __init__(self, rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                 backend=None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device, self.backend = device, backend

    @property
    def distributed(self):
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self):
        """Rank 0 logs, evaluates the summary and writes the checkpoints."""
        return self.rank == 0

    def __repr__(self):
        return (f"DistInfo(rank={self.rank}, world_size={self.world_size}, "
                f"local_rank={self.local_rank}, device={self.device}, backend={self.backend})")


def _env_int(name, default):
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def init(device=None, timeout_min=30):
    """Join the torchrun process group when launched by torchrun; choose this process's device.

    device: 'cpu', 'cuda', 'cuda:1', ... or None (CUDA when available). Under torchrun with CUDA
    each process takes GPU LOCAL_RANK (so ``--device cuda`` means "my GPU").
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU "
                               "(torch.cuda.is_available() is False); use --device cpu")
        if world_size > 1:
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"LOCAL_RANK {local_rank} has no GPU: only "
                                   f"{torch.cuda.device_count()} visible on this node; lower "
                                   f"--nproc_per_node")
            device = torch.device("cuda", local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistInfo(0, 1, 0, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min),
                                **kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shutdown():
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier():
    """Wait for all ranks."""
    if _active():
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (a no-op in one process); returns it."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj):
    """Each rank's ``obj`` in rank order (``[obj]`` in one process)."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src=0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class ShardedSampler(torch.utils.data.Sampler):
    """Rank r's share of an endless sampler: global positions r, r + W, r + 2W, ...

    With a per-rank batch of B / W, iteration i of every rank together covers exactly the global
    positions i·B .. i·B + B - 1, so the samples of a run (and of a resumed run, which starts the
    inner sampler at iteration x B) do not depend on the number of processes.
    """

    def __init__(self, sampler, rank=0, world_size=1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.sampler, self.rank, self.world_size = sampler, rank, world_size

    def __iter__(self):
        for position, key in enumerate(self.sampler):
            if position % self.world_size == self.rank:
                yield key


def all_reduce_min(tensor):
    """Minimum of a tensor over ranks in place (a no-op in one process); returns it."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor
