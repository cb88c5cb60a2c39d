"""Data-parallel training under `torchrun`: the process group, the shard of a batch each rank
trains on, and the few collectives that keep every rank's decisions identical to rank 0's.

`torchrun --nproc_per_node=N -m pipeline.cli train` sets WORLD_SIZE, RANK, LOCAL_RANK and
MASTER_ADDR/PORT; `init` reads them and joins the group (NCCL on GPUs, gloo on CPUs). Without
WORLD_SIZE, `init` returns `SINGLE`, whose collectives do nothing, and training runs exactly as
it always has in one process.

The design keeps the math of one process with the same global batch:
- every rank builds the same global batch sequence (same seed) and takes sentences r::N of each
  global batch (`shard`);
- each rank's summed loss is divided by the global batch's token count (every rank can count it,
  having the whole batch) and multiplied by N, since DDP averages gradients: the reduced gradient
  is then the one-process gradient of (summed loss / tokens);
- the sampled-softmax candidates are the global batch's gold words plus negatives drawn from a
  generator that every rank advances in lockstep (`Shard.generator`).
Rank 0 alone validates, checkpoints and logs; the others wait at a barrier and then take rank 0's
progress (history, best score, plateau scale, step, epoch), so early stopping, the best model and
the step budget are decided once, by rank 0, for all ranks."""
from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pipeline.device import default_generator

log = logging.getLogger(__name__)

# Rank 0 validates (greedy BLEU), and at the end averages checkpoints and builds the lexicon over
# (a sample of) the training split, while the others wait: far longer than a collective's usual limit.
DEFAULT_TIMEOUT_MINUTES = 120


@dataclass
class Shard:
    """One rank's part of a global batch, and what it needs to compute its part of the loss."""

    rows: np.ndarray  # this rank's rows of the split (never empty: see `shard`)
    weight: float  # 1.0, or 0.0 for a stand-in row when the global batch has fewer rows than ranks
    tokens: int  # target tokens (with <eos>) in the whole global batch: the loss's divisor
    gold_words: torch.Tensor  # the global batch's distinct target ids: the certain candidates
    world_size: int
    generator: torch.Generator | None  # draws the sampled-softmax negatives, identical on all ranks


@dataclass(frozen=True)
class Distributed:
    """The process group as training sees it; `SINGLE` (world size 1, not initialised) is one process."""

    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (itself in one process)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's `obj` on rank 0 (a list by rank), None elsewhere."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def sum(self, value: float, device: torch.device) -> float:
        if not self.enabled:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return float(total.item())

    def shard(self, rows: np.ndarray, targets, eos: int, device: torch.device,
              generator: torch.Generator | None) -> Shard:
        """Sentences rank::world_size of a global batch (rows sorted by length, so every rank gets
        about the same lengths). A rank left without a sentence (a global batch smaller than the
        world) runs the first sentence with weight 0, so that DDP still sees its backward.
        `targets[i]` is row i's target ids (a list, or the memory-mapped ids of ParallelData.tgt)."""
        mine = rows[self.rank::self.world_size]
        weight = 1.0
        if len(mine) == 0:
            mine, weight = rows[:1], 0.0
        gold = np.unique(np.concatenate([np.asarray(targets[i], dtype=np.int64) for i in rows] + [np.array([eos])]))
        tokens = int(sum(len(targets[i]) + 1 for i in rows))
        return Shard(mine, weight, tokens, torch.from_numpy(gold).to(device), self.world_size, generator)

    def close(self) -> None:
        """Leave the group once every rank is done: a gloo rank that closes its connections while
        a peer still reads from them makes that peer abort. The DDP wrapper (reference cycles)
        is collected first, so that it does not outlive the group."""
        if self.enabled and dist.is_initialized():
            dist.barrier()
            gc.collect()
            dist.destroy_process_group()


SINGLE = Distributed()


def requested() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def init(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun describes in the environment, or return SINGLE without
    WORLD_SIZE. On CUDA each rank takes the GPU of its LOCAL_RANK (returned as the device)."""
    if not requested():
        return SINGLE, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    minutes = float(os.environ.get("VAMOS_DIST_TIMEOUT_MINUTES", DEFAULT_TIMEOUT_MINUTES))
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=minutes), **kwargs)
    if rank != 0:  # one voice in the log: rank 0 reports for all
        logging.getLogger("pipeline").setLevel(logging.WARNING)
    log.info("data-parallel training: %d processes (%s), %d on this node", world, backend, local_world)
    return Distributed(True, rank, world, local_rank, local_world), device


def threads_per_rank(cores: int, local_world_size: int) -> int:
    """CPU threads for each of the ranks that share this node's cores: never oversubscribed."""
    return max(1, cores // max(local_world_size, 1))


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of rank > 0 (rank 0 goes on with the one-process stream): its dropout and
    teacher-forcing draws differ from every other rank's."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def shared_generator(device: torch.device) -> torch.Generator:
    """A generator that starts where torch's default generator for `device` stands now (right after
    the model's initialisation, the same on every rank): in one process the negatives come from
    the default generator, so with dropout 0 DDP draws the same negatives as one process."""
    generator = torch.Generator(device=device)
    generator.set_state(default_generator(device).get_state())
    return generator
