"""Data-parallel training under torchrun: every process (rank) takes its share of each global batch, and their
gradients are summed before each optimizer step.

``torchrun --nproc-per-node N -m gloss_cli train --batch-size B`` takes the same steps over the same examples as one
process with ``--batch-size N*B``: every rank draws the same global batches (same seed), takes every N-th example of
each, and scales each micro-batch's loss by its share of the *global* step's label tokens, which every rank knows
without asking the others (it counts them in the global batch). The summed gradient is then the one process's,
up to the order of the floating-point additions.

The gradients are summed by an explicit all-reduce after a step's micro-batches, not by DistributedDataParallel:

- the completion loss calls the decoder and the LM head itself (``train._Loop._completion_loss``), past the model's
  ``forward``, which is where DDP prepares the hooks that reduce the gradients;
- the last global batch of an epoch can hold fewer examples than there are ranks, leaving a rank nothing to
  compute, while DDP needs a forward and a backward on every rank at every step;
- a plain sum of the token-weighted gradients is exactly the normalisation above; DDP averages (divides by N).

What that costs: the all-reduce does not overlap the last micro-batch's backward as DDP's buckets do. It is one
all-reduce per ``BUCKET_BYTES`` of trainable gradients a step: LoRA's are a few MB, a full fine-tune of a
135M-parameter model 0.5 GB, small next to a step of 64 examples over NVLink.

Every rank computes the same decisions from the same numbers: an all-reduce leaves the same bits on every rank (ring
and tree algorithms compute each sum once and copy it; DDP relies on this too), so the weights stay identical, the
gradient norm and the skip of a non-finite step agree, and the validation loss is, for good measure, rank 0's
(:func:`from_main`). What rank 0 measures alone (the time budget's speed and deadline) is sent to the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gloss_cli.distributed import World, init_process_group, world
from gloss_cli.errors import GlossError

BUCKET_BYTES = 64 * 2**20  # gradients flattened into one buffer per all-reduce


class RankError(GlossError):
    """An error that concerns one rank alone (its GPU), so that rank reports it, not rank 0. Other GlossErrors of a
    torchrun run are rank 0's to report: every rank reads the same flags, files and collective results."""


def join(device: str) -> World:
    """This process's place, and the process group joined (once; a single process joins nothing). Rank 0 joins after
    it has checked the settings and taken the project lock, the others as they start (commands.train), so that they
    wait in the rendezvous and never report what rank 0 has already refused; the barrier makes the wait real on
    NCCL, whose init returns without one."""
    here = world()
    if not here.several:
        return here
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return here
    if device == "cuda" and here.local_rank >= torch.cuda.device_count():
        raise RankError(
            f"Process {here.rank} (LOCAL_RANK {here.local_rank}) has no GPU: this machine has "
            f"{torch.cuda.device_count()}.",
            f"Start at most {torch.cuda.device_count()} processes per machine: torchrun --nproc-per-node "
            f"{torch.cuda.device_count()} -m gloss_cli train ...",
        )
    init_process_group(device)
    if device == "cuda":
        dist.barrier(device_ids=[here.local_rank])
    else:
        dist.barrier()
    return here


def leave() -> None:
    """The process group left, once every rank is past its last collective."""
    from gloss_cli.distributed import destroy_process_group

    destroy_process_group()


def check_examples(examples: int, here: World) -> None:
    if examples < here.size:
        raise GlossError(
            f"{examples} train example(s) cannot be shared by {here.size} processes: every process needs at least "
            "one example a step.",
            "Start fewer processes (torchrun --nproc-per-node), or train on more users (--limit-users).",
        )


def share(batch: list[int], here: World) -> list[int]:
    """This rank's examples of a global batch: every N-th. Batches are sorted by length, so each rank gets a
    spread of lengths like the others' (the slowest rank sets the step's pace)."""
    return batch[here.rank :: here.size]


def start(params: Sequence[Any], seed: int) -> None:
    """Rank 0's values of the trainable ``params`` on every rank, as DDP makes its start (the same seed gives them
    already); then each rank draws its own random numbers (LoRA's dropout masks), rank 0 as one process would."""
    here = world()
    if not here.several:
        return
    import torch
    import torch.distributed as dist

    for p in params:
        dist.broadcast(p.data, src=0)
    if not here.main:
        torch.manual_seed(seed + here.rank)


def sum_step(params: Sequence[Any], loss_sum: Any) -> None:
    """A step's gradients and token-weighted loss sum, each replaced by its sum over the ranks (nothing changes
    for one process). A rank that computed nothing this step adds zeros (its gradients are None after
    ``zero_grad(set_to_none=True)``)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.all_reduce(loss_sum)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(params):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        start = 0
        for p in bucket:
            p.grad.copy_(flat[start : start + p.numel()].view_as(p.grad))
            start += p.numel()


def _buckets(params: Sequence[Any]) -> list[list[Any]]:
    """Parameters in groups of one dtype and at most BUCKET_BYTES of gradient (a bigger one alone)."""
    buckets: list[list[Any]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if not buckets or buckets[-1][0].dtype != p.dtype or size + nbytes > BUCKET_BYTES:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


def sum_over_ranks(value: Any) -> Any:
    """A tensor summed over the ranks, in place (itself for one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
    return value


def from_main(value: float) -> float:
    """Rank 0's ``value`` on every rank (the value itself for one process); float64, so an int or bool survives."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())
