"""Everything that lets a training stop and go on exactly: which training a checkpoint belongs to
(the fingerprint), its progress, every random state, one `resume` for one process and DDP alike,
and the weight snapshots that checkpoint averaging takes the mean of."""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import distributed, storage
from pipeline.config import Params
from pipeline.device import default_generator

# Params that only decide when training stops or how fast it runs: changing them continues the
# same training (under `lr_schedule: plateau`, `dvc exp run -S train.epochs=20` resumes from the
# last checkpoint; a decaying schedule's plan depends on epochs and max_steps, see fingerprint).
# `device` is among them as written (`auto` is either), and the device that runs is hashed instead:
# CUDA kernels give other numbers than the CPU's. `threads` is, although another thread count sums in
# another order (last-bit differences): a resume may use other threads, and bit-identical runs
# need the same count (the default, all cores, on the same kind of machine). `lexicon` only adds a
# dictionary to model.pt after training, so it continues the same training too (as `lexicon_pairs`).
NOT_IN_FINGERPRINT = {"epochs", "max_steps", "patience", "smoothing", "max_minutes", "checkpoint_every", "threads",
                      "lexicon", "lexicon_pairs", "device"}
# Everything `train` runs that can change what it computes (decode.py: validation BLEU picks the model).
CODE = ["train.py", "loss.py", "schedule.py", "checkpoint.py", "validation.py", "device.py", "distributed.py",
        "data.py", "token_ids.py", "text.py", "embeddings.py", "decode.py", "metrics.py", "lexicon.py", "model/*.py"]
CHECKPOINT_FILE = "last.pt"


def training_inputs(prepared: Path, embeddings: Path) -> list[Path]:
    """The files that stand for training's data in the fingerprint: prepare's manifest (the md5 of
    every file prepare wrote, so the corpus is never read to hash it), the vocabularies and the
    word vectors."""
    manifest = prepared / storage.PREPARED_MANIFEST.name
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} is missing: run `vamos prepare`")
    return [manifest, prepared / "vocab.src.json", prepared / "vocab.tgt.json", *sorted(embeddings.glob("*.w2v"))]


def fingerprint(params: Params, inputs: list[Path], precision: str, device: torch.device) -> str:
    """Which training a checkpoint belongs to: the train params that change what it computes, the
    device type and precision it computes in here, the seed, the input files (small ones: see
    `training_inputs`) and the training code (so a GPU checkpoint never resumes on a CPU, nor a
    bf16 one in fp32, or the reverse)."""
    exclude = set(NOT_IN_FINGERPRINT)
    if params.train.lr_schedule != "plateau":
        exclude -= {"epochs", "max_steps"}  # a decaying schedule is stretched to the planned length
    train = params.train.model_dump(exclude=exclude)
    digest = hashlib.sha1(json.dumps([params.seed, train, precision, device.type], sort_keys=True).encode())
    code = Path(__file__).parent
    sources = sorted(p for pattern in CODE for p in code.glob(pattern))
    for path in sorted(inputs) + sources:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class Progress:
    """Everything besides weights and optimizer that an exact resume needs."""

    epoch: int = 0  # whole epochs done
    batch: int = 0  # next batch within the epoch
    step: int = 0
    epoch_loss: float = 0.0  # summed over the current epoch so far
    epoch_tokens: int = 0
    elapsed: float = 0.0  # seconds in the training loop so far, over all resumes
    update_seconds: float = 0.0  # of those, seconds in stretches of updates (with their checkpoints; no validation)
    tokens_trained: int = 0  # target tokens of every update so far
    plateau_scale: float = 1.0  # lr factor from plateau halvings
    best_valid_loss: float = math.inf
    best_bleu: float = -1.0
    history: list[dict] = field(default_factory=list)
    run_id: str = ""

    def next_epoch(self) -> None:
        self.epoch, self.batch, self.epoch_loss, self.epoch_tokens = self.epoch + 1, 0, 0.0, 0

    @property
    def validated(self) -> bool:
        """Whether the last update has been measured (a resumed run may owe that validation)."""
        return bool(self.history) and self.history[-1]["step"] == self.step

    @property
    def tokens_per_sec(self) -> float:
        """Over every update of the training, resumes included: weighted by time, not by stretch."""
        return self.tokens_trained / self.update_seconds if self.update_seconds else 0.0


def rng_state() -> dict:
    """Every random generator training draws from: torch's (dropout, sampled softmax, teacher
    forcing), CUDA's, and Python's and numpy's global ones for any library that uses them (batch
    order uses its own seeded generator, so it needs no state)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    random.setstate((state["python_version"], tuple(state["python"]), None))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def saved_generator_state(rng: dict, device: torch.device) -> torch.Tensor:
    """The state of `device`'s default generator in an `rng_state()`."""
    return (rng["cuda"][device.index or 0] if device.type == "cuda" else rng["torch"]).cpu()


def save(path: Path, model, optimizer, progress: Progress, dist: distributed.Distributed = distributed.SINGLE,
         generator: torch.Generator | None = None) -> None:
    """The checkpoint, written atomically; under DDP a collective: rank 0 writes it with every
    rank's random state and the state of the negatives' shared generator. `model` is the plain
    module, never a DDP wrapper, so any checkpoint loads in one process."""
    states = dist.gather(rng_state())
    if not dist.is_main:
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "progress": progress.__dict__,
             "rng": states[0]}
    if dist.enabled:
        state |= {"rng_ranks": states, "candidates_rng": generator.get_state()}
    with storage.atomic_path(path) as tmp:
        torch.save(state, tmp)


def resume(path: Path, model, optimizer, device: torch.device, seed: int,
           dist: distributed.Distributed = distributed.SINGLE, generator: torch.Generator | None = None
           ) -> Progress | None:
    """Load the checkpoint at `path` into `model` and `optimizer` and restore the random states;
    None (on every rank) when there is none. Rank 0 reads it and sends it to every rank (nodes need
    not share a disk). A rank takes its own random state back; from a checkpoint of another world
    size, rank 0 takes the saved one and the others a seed of their own. Loaded on the CPU: the
    random states must be CPU tensors, and load_state_dict moves weights and Adam's moments to the
    parameters' device."""
    state = torch.load(path, map_location="cpu", weights_only=True) if dist.is_main and path.exists() else None
    state = dist.broadcast(state)
    if state is None:
        return None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    ranks = state.get("rng_ranks")
    if ranks and len(ranks) == dist.world_size:
        set_rng_state(ranks[dist.rank])
    else:
        set_rng_state(state["rng"])
        if not dist.is_main:
            torch.manual_seed(distributed.rank_seed(seed + state["progress"]["step"], dist.rank))
    # Where the negatives' draws go on: under DDP a generator shared by the ranks, in one process
    # the default generator; a checkpoint of either kind continues under the other.
    candidates = state.get("candidates_rng")
    if generator is not None:
        generator.set_state(candidates.cpu() if candidates is not None else saved_generator_state(state["rng"], device))
    elif candidates is not None:
        default_generator(device).set_state(candidates.cpu())
    return Progress(**state["progress"])


def keep_snapshot(run_dir: Path, model, step: int, keep: int) -> None:
    """The weights at a validation, the last `keep` of them kept for averaging."""
    with storage.atomic_path(run_dir / f"weights-{step:08d}.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    for old in sorted(run_dir.glob("weights-*.pt"))[:-keep]:
        old.unlink()


def averaged_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The mean of the kept snapshots: smoother than any one of them (Vaswani et al. average the
    last checkpoints for the same reason)."""
    snapshots = [torch.load(p, map_location="cpu", weights_only=True) for p in sorted(run_dir.glob("weights-*.pt"))]
    return {name: torch.stack([s[name].float() for s in snapshots]).mean(0).to(snapshots[0][name].dtype)
            for name in snapshots[0]}
