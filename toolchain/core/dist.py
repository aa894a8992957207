"""Several training processes (``torchrun``, ``accelerate launch``): who this process is, and meeting points.

A launcher starts one process per device and tells each who it is in the environment: ``RANK``
(0..WORLD_SIZE-1 over all machines), ``WORLD_SIZE`` and ``LOCAL_RANK`` (the device on this machine),
with ``MASTER_ADDR``/``MASTER_PORT`` where rank 0 listens. Without a launcher these are unset and
edgesmith is one process (rank 0 of 1), and nothing here touches ``torch.distributed``.

How edgesmith uses them (``toolchain.pipeline.runner``): rank 0 runs and writes every stage; the other
ranks wait at :func:`share`, read rank 0's artifacts, train with it (DDP through the transformers
Trainer, which joins the same process group), and stop after the train stage; :func:`leave` closes
the group and makes the rest of rank 0's run a single process again.

The process group: the Trainer's accelerate state creates it only when none exists, so the group made
here for the first meeting (gloo on the CPU, nccl on CUDA) is the one training uses.
"""
from __future__ import annotations

import os

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
               "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def rank() -> int:
    """This process's rank over all machines (0 without a launcher)."""
    return _env_int("RANK", 0)


def world_size() -> int:
    """How many processes train together (1 without a launcher)."""
    return max(1, _env_int("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's device index on its machine (0 without a launcher)."""
    return _env_int("LOCAL_RANK", 0)


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """Whether this process writes artifacts, logs and the report (rank 0, or the only process)."""
    return rank() == 0


def backend() -> str:
    """nccl where this process has a CUDA device, else gloo (the Trainer's choice on the CPU too)."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def ensure_group() -> bool:
    """Join the launcher's process group unless this process is alone or already in one; True if joined here."""
    if not is_distributed():
        return False
    import torch
    import torch.distributed as tdist

    if tdist.is_initialized():
        return False
    if backend() == "nccl":
        torch.cuda.set_device(local_rank())
    tdist.init_process_group(backend=backend())
    return True


def barrier() -> None:
    """Wait until every rank is here (nothing without a launcher)."""
    if not is_distributed():
        return
    import torch.distributed as tdist

    ensure_group()
    if tdist.get_backend() == "nccl":
        tdist.barrier(device_ids=[local_rank()])
    else:
        tdist.barrier()


def share(value=None):
    """Rank 0's ``value`` on every rank (a picklable object); also a meeting point. The other ranks' argument
    is ignored. Without a launcher, ``value`` itself."""
    if not is_distributed():
        return value
    import torch.distributed as tdist

    ensure_group()
    box = [value if is_main() else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def leave() -> None:
    """Close the process group (if any) and forget the launcher's variables: what this process runs next
    (and the workers it starts) is a single process. Safe to call more than once."""
    if is_distributed():
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()
    for name in LAUNCH_VARS:
        os.environ.pop(name, None)
