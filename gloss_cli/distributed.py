"""Several processes, one per device, under torchrun: this process's place and the process group they share.

``torchrun --nproc-per-node N -m gloss_cli <command> ...`` starts N copies of gloss with RANK, WORLD_SIZE and
LOCAL_RANK set; without them gloss is one process (rank 0 of 1) and none of this costs anything. The process group
uses NCCL between CUDA devices and gloo between CPU processes (the tests run 2 gloo processes on a CPU).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from gloss_cli.errors import GlossError

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
T = TypeVar("T")


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


# Collectives of sharded generation and scoring. They run on a gloo group of their own (CPU tensors, also beside an
# NCCL default group) with a long timeout: a process that has done its share waits there for the slowest one, and on
# a resumed run one process may have all its share left while the others have none (the default timeouts are 10
# minutes for NCCL, 30 for gloo).
# A process that fails is not waited for: torchrun stops the others when one exits with an error.
WAIT_DAYS = 7
_cpu_group: Any = None


@contextlib.contextmanager
def _together() -> Iterator[None]:
    """A collective call, whose failure means that another process of the run failed or stopped answering: one
    line saying so (that process's own error is in torchrun's log), not this process's traceback."""
    try:
        yield
    except RuntimeError as exc:  # torch's DistBackendError is one: gloo's "Connection reset by peer", a timeout
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GlossError(
            f"Another process of this run failed or stopped answering ({reason[:300]}).",
            "Its own error is in the log above (torchrun names its rank); fix it, then run the same command again.",
        ) from exc


def _group() -> Any:
    """The gloo group of this run, made on first use (every process makes its collective calls in the same order),
    or None for one process."""
    global _cpu_group
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    if _cpu_group is None:
        _cpu_group = dist.new_group(backend="gloo", timeout=timedelta(days=WAIT_DAYS))
    return _cpu_group


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every process (one process: ``value``)."""
    group = _group()
    if group is None:
        return value
    import torch.distributed as dist

    box = [value]
    with _together():
        dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def gather(value: T) -> list[T]:
    """Every process's ``value`` by rank, on rank 0; ``[]`` elsewhere (one process: ``[value]``)."""
    group = _group()
    if group is None:
        return [value]
    import torch.distributed as dist

    here = world()
    found: list[Any] = [None] * here.size if here.main else []
    with _together():
        dist.gather_object(value, found if here.main else None, dst=0, group=group)
    return found


def all_min(value: int) -> int:
    """The least of every process's ``value``."""
    group = _group()
    if group is None:
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64)
    with _together():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group)
    return int(tensor.item())


def wait_all() -> None:
    """Wait for every process, as long as a share of the work can take (:func:`barrier` waits its group's timeout)."""
    group = _group()
    if group is not None:
        import torch.distributed as dist

        with _together():
            dist.barrier(group=group)


def leave() -> None:
    """This process is done with its collectives: the process group goes (NCCL warns at exit otherwise)."""
    global _cpu_group
    _cpu_group = None
    destroy_process_group()
