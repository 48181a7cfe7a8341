"""Several processes, one per device, under torchrun: this process's place and the process group they share.

``torchrun --nproc-per-node N -m gloss_cli <command> ...`` starts N copies of gloss with RANK, WORLD_SIZE and
LOCAL_RANK set; without them gloss is one process (rank 0 of 1) and none of this costs anything. The process group
uses NCCL between CUDA devices and gloo between CPU processes (the tests run 2 gloo processes on a CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from gloss_cli.errors import GlossError

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes what is written once (stages, the manifest, the console's table)."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place, read from torchrun's environment (one process when it is not set)."""
    values = {name: os.environ.get(name) for name in _ENV}
    if values["WORLD_SIZE"] is None:
        return World()
    try:
        rank, size, local = (int(values[name] or 0) for name in _ENV)
    except ValueError:
        raise GlossError(
            f"RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (got {values}).",
            "Launch several processes with torchrun --nproc-per-node N -m gloss_cli ..., or unset them.",
        ) from None
    if size < 1 or not 0 <= rank < size or local < 0:
        raise GlossError(
            f"RANK {rank} does not fit WORLD_SIZE {size} (LOCAL_RANK {local}).",
            "Launch several processes with torchrun --nproc-per-node N -m gloss_cli ..., or unset them.",
        )
    return World(rank, size, local)


def init_process_group(device: str) -> World:
    """The process group of this run (NCCL on CUDA, gloo on CPU), joined once; on CUDA each process takes the
    device of its LOCAL_RANK. A single process joins nothing."""
    here = world()
    if not here.several:
        return here
    import torch
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(here.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return here


def barrier() -> None:
    """Wait for every process of the group (a no-op for one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
