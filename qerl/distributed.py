"""Data-parallel RL over processes that `torchrun` starts: `torchrun --nproc-per-node N -m qerl train ...`.

Every rank holds the whole quantized model (one copy, shared by its rollout engine and its
optimizer) and samples its share of each step's prompts, all G completions of a prompt on one
rank, so rewards and group advantages need nothing from the other ranks. What crosses ranks
goes through a `World` (this module), in the trainer's and the update's own code:

- the loss normalizers: each rank's loss divides its tokens' sum by the token and sequence
  counts of the WHOLE step's batch (`World.sum`), so the SUM of the ranks' gradients
  (`World.sum_gradients`) is the one-process gradient of the same batch, and clipping and
  AdamW then run on identical numbers on every rank: the adapters stay identical;
- agreement on what every rank does next: dynamic-sampling rounds (`qerl.rl.fill_batch`),
  a skipped update (a non-finite loss on any rank), a stop signal (Ctrl-C / SIGTERM);
- rank 0's LoRA weights at the start and its AQN noise at each rollout (`World.broadcast_`),
  so that every rank samples from the same policy;
- metrics and RNG states, gathered for rank 0, which alone logs, evaluates, plots and writes
  checkpoints (the others wait at their next collective; `TIMEOUT` bounds the wait).

Gradients are summed by an explicit all-reduce of the trainable parameters (LoRA, trainable
norms) in flat buckets after the last micro-batch's backward, not by DDP: the module is also the
rollout engine's model and a DDP wrapper would sit in every decode step's path; DDP needs the
same number of forward/backward passes on every rank, and ranks here run different numbers of
micro-batches (dynamic sampling, groups skipped for zero advantage); and DDP divides by the
world size, while the global normalizers already make the sum the batch mean. The cost: one
all-reduce of the adapter's gradients per update that backward does not hide (160 MB in fp32 for
Qwen2.5-7B at LoRA rank 16).

NCCL when the model is on a GPU (each rank on `cuda:LOCAL_RANK`), gloo on CPUs. Without the
torchrun environment (`WORLD_SIZE` unset or 1) the `World` has size 1 and every method returns
at once without touching `torch.distributed`: one-process runs need nothing and are unchanged.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import QerlError

# How long a rank waits at a collective: rank 0 evaluates and writes checkpoints while the others wait.
TIMEOUT = timedelta(minutes=60)
BUCKET_BYTES = 32 * 2**20  # gradients are all-reduced in flat fp32 buckets of at most this size


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collectives' tensors live: cuda:LOCAL_RANK under NCCL, cpu under gloo

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's contiguous share of `items` (a multiple of `size` long): rank r gets the r-th slice."""
        n = len(items) // self.size
        return items[self.rank * n : (self.rank + 1) * n]

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (exact for integer counts below 2^53)."""
        return self._reduce(values, "SUM")

    def max(self, *values: float) -> list[float]:
        return self._reduce(values, "MAX")

    def _reduce(self, values, op: str) -> list[float]:
        if self.size == 1:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t.tolist()

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` (picklable) on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=torch.device(self.device))
        return box[0]

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite `tensors` in place with rank 0's values."""
        if self.size == 1:
            return
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.detach(), src=0)

    def sum_gradients(self, params: list[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> float:
        """Sum `.grad` of `params` over the ranks, in place: one all-reduce per flat fp32 bucket.
        A parameter without a gradient on this rank (it ran no micro-batch) contributes zeros.
        Returns the seconds it took on this rank, device work included (0.0 with one rank); the time
        includes waiting for the slowest rank to reach it."""
        if self.size == 1:
            return 0.0
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize(self.device)  # backward's kernels are not the all-reduce's time
        t0 = time.perf_counter()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets(params, bucket_bytes):
            flat = torch.cat([p.grad.reshape(-1).float() for p in bucket])
            dist.all_reduce(flat)
            for p, g in zip(bucket, flat.split([p.numel() for p in bucket])):
                p.grad.copy_(g.view_as(p.grad))
        if cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0


def _buckets(params: list[torch.Tensor], bucket_bytes: int):
    """Consecutive runs of `params` of at most `bucket_bytes` of fp32 gradients (a larger one alone)."""
    bucket, size = [], 0
    for p in params:
        if bucket and size + p.numel() * 4 > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel() * 4
    if bucket:
        yield bucket


def world_from_env() -> World:
    """The ranks torchrun asked for (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`), before any process group exists."""
    env = os.environ
    try:
        size, rank, local = (int(env.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    except ValueError:
        raise QerlError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them)") from None
    return World(rank=rank, size=max(size, 1), local_rank=local)


def check_shares(prompts_per_step: int, group_size: int, world_size: int) -> None:
    """A step's prompts split into whole groups on every rank, or a one-line error (before the model loads)."""
    if world_size <= 1:
        return
    if prompts_per_step < world_size:
        raise QerlError(
            f"config: {world_size} ranks but rollout.prompts_per_step is {prompts_per_step}: "
            "every rank needs at least one prompt; use at most as many ranks as prompts per step"
        )
    if prompts_per_step % world_size:
        raise QerlError(
            f"config: rollout.prompts_per_step ({prompts_per_step}) does not divide across {world_size} ranks: "
            f"each rank samples whole groups (a prompt and its rollout.group_size = {group_size} completions), "
            "so prompts_per_step must be a multiple of the number of ranks"
        )


def rank_device(configured: str | None, world: World) -> str | None:
    """The model's device on this rank: with several ranks on GPUs, cuda:LOCAL_RANK."""
    if world.size == 1 or not torch.cuda.is_available() or configured == "cpu":
        return configured
    if configured not in (None, "cuda"):
        raise QerlError(
            f"config: model.device is {configured}, but under torchrun each rank uses cuda:LOCAL_RANK; "
            "set model.device to cuda (or none)"
        )
    return f"cuda:{world.local_rank}"


def init(device: torch.device) -> World:
    """Join the process group torchrun describes (NCCL for a CUDA `device`, else gloo); size 1: nothing to join."""
    world = world_from_env()
    if world.size == 1:
        return world
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return World(world.rank, world.size, world.local_rank, f"cuda:{world.local_rank}" if cuda else "cpu")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of a rank's sampling generator: the run's own seed for rank 0 of a fresh run (so a
    one-process run samples as it always did), a hash of (seed, rank, step) otherwise (a rank that
    a resumed run adds at `step` starts a stream of its own)."""
    if rank == 0 and step == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"qerl/{seed}/{rank}/{step}".encode()).digest()[:8], "little") >> 1
