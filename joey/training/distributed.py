"""Training past one process: the launcher's view (``torchrun``, ``accelerate launch``) for the training
commands.

The launchers describe a process by environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``);
when there is more than one process, ``init`` joins the process group (NCCL on GPUs, gloo on CPUs)
and every helper here reads the group. A single process without a launcher never creates a group,
so it behaves exactly as before: rank 0 of a world of 1, and ``barrier`` does nothing.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank() -> int:
    """This process's global rank (0 without a launcher)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes train together (1 without a launcher)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's rank on its machine: the index of the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes shared files, shows progress and logs."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (nothing to wait for in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def init(device: str | None) -> str | None:
    """Join the launcher's process group when there is more than one process; returns the device this
    rank uses (``device`` unchanged for a single process, or on CPUs)."""
    if world_size() <= 1 or dist.is_initialized():
        return device
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda:  # one GPU per process, picked by the launcher's local rank
        torch.cuda.set_device(local_rank())
        device = f"cuda:{local_rank()}"
    dist.init_process_group("nccl" if cuda else "gloo")
    return device


def wrap(net: torch.nn.Module, find_unused: bool = False) -> torch.nn.Module:
    """``net`` under DistributedDataParallel when training in several processes (its gradients are
    averaged over the ranks during backward); ``net`` itself otherwise."""
    if not dist.is_initialized() or world_size() <= 1:
        return net
    device = next(net.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids, find_unused_parameters=find_unused)


def share(batch: list[int]) -> tuple[list[int], float]:
    """This rank's share of a global batch (every world-th sequence, so the ranks together see it
    all) and the factor its summed loss takes: the world size, since DDP averages the ranks'
    gradients. A rank left without a sequence runs the batch's first with factor 0, so that it
    still takes part in the gradient exchange and adds nothing."""
    mine = batch[rank() :: world_size()]
    return (mine, float(world_size())) if mine else (batch[:1], 0.0)
