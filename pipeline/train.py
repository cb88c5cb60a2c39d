"""The training loop: teacher forcing, a masked sampled-softmax loss, Adam with a learning-rate
schedule, early stopping on smoothed validation BLEU, checkpoint averaging, and checkpoints that
resume exactly after a crash.

Training stops after `epochs` or `max_steps` updates, so the same seed and data give the same
weights on every run; `max_minutes` is only a safety net, and says so loudly when it fires."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import math
import os
import random
import resource
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import sacrebleu
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline import distributed, storage
from pipeline.config import Params, TrainParams
from pipeline.data import Corpus, ParallelData, load_corpus
from pipeline.decode import Translator
from pipeline.embeddings import embedding_matrix
from pipeline.lexicon import build_lexicon
from pipeline.model import ModelConfig, Seq2Seq, save_model
from pipeline.model.precision import has_bf16
from pipeline.text import EOS_ID, PAD_ID, SOS_ID, UNK_ID, Tokenizer, tokenizers
from pipeline.tracking import dvc_hashes, experiment_name, flatten, git_commit, mlflow_setup

__all__ = ["pick_device", "sequence_loss", "train_step", "train", "tokenizers", "initial_model"]

log = logging.getLogger(__name__)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse: blocks above its mmap limit (32 MiB at most)
    go back to the OS when freed, and each fresh page then costs a page fault. Full-softmax logits
    (batch tokens x vocabulary, 160 MB) are such blocks, allocated several times a step: the
    reference model trained 1.2x as fast with this. Nothing changes in what is computed. It holds
    for the whole process, so only the `vamos train` stage (a process of its own) and the
    benchmarks call it; False where the C library is not glibc."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    # M_MMAP_MAX 0: every block from the heap; M_TRIM_THRESHOLD: give back only a free GiB at its top.
    return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 1 << 30))


# ---------------------------------------------------------------------------------------------
# The loss

# Never a target, so never a sampled candidate: they join every candidate set instead, which
# teaches the model to keep their logits low.
ALWAYS_NEGATIVE = (PAD_ID, SOS_ID)


@functools.lru_cache(maxsize=4)
def log_uniform(vocab_size: int, device: torch.device) -> torch.Tensor:
    """Zipf's law over ids, P(k) ∝ log((k + 2) / (k + 1)) (TF's log_uniform_candidate_sampler): the
    vocabulary is sorted by frequency, so this approximates the unigram distribution without counts."""
    probs = torch.log1p(1.0 / (torch.arange(vocab_size, dtype=torch.float64) + 1.0))
    probs[list(ALWAYS_NEGATIVE)] = 0.0
    return (probs / probs.sum()).float().to(device)


def sampled_logits(hidden: torch.Tensor, gold: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   negatives: int, gold_words: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled softmax with the log-Q correction, shared by the batch. The candidates are the
    batch's gold words, <pad> and <sos>, all certain members that count exactly (uncorrected), plus
    the other words among `negatives` draws from log_uniform, each logit lowered by the log of its
    inclusion probability 1 - (1 - p)^negatives. The draws' exp-logits are then an unbiased
    (Horvitz-Thompson) estimate of the rest of the softmax's normaliser, so a rare gold word is not
    favoured for being present, and as `negatives` grows the loss tends to the full softmax's.
    Returns (logits N x C, each position's gold column). Under DDP a rank holds part of the batch:
    `gold_words` (the whole batch's gold words, a superset of `gold`) and `generator` (advanced in
    lockstep on every rank) give every rank the candidates one process would use."""
    words = gold if gold_words is None else gold_words
    certain = torch.unique(torch.cat([words, torch.tensor(ALWAYS_NEGATIVE, device=gold.device)]))  # sorted
    probs = log_uniform(weight.size(0), gold.device)
    drawn = torch.unique(torch.multinomial(probs, negatives, replacement=True, generator=generator))
    drawn = drawn[~torch.isin(drawn, certain)]
    log_inclusion = torch.log(-torch.expm1(negatives * torch.log1p(-probs[drawn])))
    candidates = torch.cat([certain, drawn])
    logits = F.linear(hidden, weight[candidates], bias[candidates]).float()
    correction = torch.cat([torch.zeros_like(certain, dtype=logits.dtype), log_inclusion])
    return logits - correction, torch.searchsorted(certain, gold)


def sequence_loss(model: Seq2Seq, attentional: torch.Tensor, targets: torch.Tensor, negatives: int,
                  label_smoothing: float, gold_words: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over real (non-pad) target positions, all time steps at once: sampled
    softmax in training when 0 < `negatives` < vocabulary (most of the saving on a CPU), else and in
    evaluation the full softmax."""
    mask = targets != PAD_ID
    hidden, gold = attentional[mask], targets[mask]
    weight, bias = model.generator.weight, model.generator.bias
    if model.training and 0 < negatives < weight.size(0):
        logits, gold_columns = sampled_logits(hidden, gold, weight, bias, negatives, gold_words, generator)
    else:
        logits, gold_columns = F.linear(hidden, weight, bias).float(), gold
    loss = F.cross_entropy(logits, gold_columns, reduction="sum", label_smoothing=label_smoothing)
    return loss, int(gold.numel())


def drop_words(ids: torch.Tensor, rate: float) -> torch.Tensor:
    """Word dropout: each word (not <pad>, <sos> or <eos>) becomes <unk> with probability `rate`,
    so the model cannot lean on every input word and learns to translate around unknown ones.
    At rate 0 it draws nothing, so the random streams (and the weights) are those of a run without it."""
    if rate == 0.0:
        return ids
    drop = (torch.rand(ids.shape, device=ids.device) < rate) & (ids > EOS_ID)
    return ids.masked_fill(drop, UNK_ID)


def autocast(cfg: TrainParams, device: torch.device):
    """bf16 mixed precision (no loss scaling needed) where the hardware has bf16: CUDA, and CPUs
    with AVX512-BF16 or AMX, where it trains 1.3x (hidden 256) to 1.6x (hidden 512, 2 layers) as
    fast as fp32. Elsewhere fp32: emulated bf16 would be slower."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and has_bf16(device))


def training_precision(cfg: TrainParams, device: torch.device) -> str:
    """What training computes in on this machine: `amp` alone does not say (no bf16, no autocast)."""
    return "bf16 mixed" if cfg.amp and has_bf16(device) else "fp32"


def train_step(model: Seq2Seq, optimizer, batch, cfg: TrainParams, net=None,
               shard: distributed.Shard | None = None) -> tuple[float, int]:
    """One teacher-forced update; returns the summed loss and the number of target tokens.
    Under DDP, `net` is the DistributedDataParallel wrapper of `model` and `batch` this rank's
    `shard` of the global batch: the loss is divided by the global batch's tokens and multiplied
    by the world size (DDP averages gradients), so the reduced gradient is one process's; the
    loss returned is still this rank's sum (the caller adds up the ranks')."""
    rate = cfg.word_dropout
    batch = replace(batch, src=drop_words(batch.src, rate), tgt_in=drop_words(batch.tgt_in, rate))
    if shard is None:
        with autocast(cfg, batch.src.device):
            attentional, _ = model(batch.src, batch.src_len, batch.tgt_in, cfg.teacher_forcing)
            loss, tokens = sequence_loss(model, attentional, batch.tgt_out, cfg.sampled_softmax, cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        (loss / tokens).backward()
    else:
        with autocast(cfg, batch.src.device):
            attentional, _ = net(batch.src, batch.src_len, batch.tgt_in, cfg.teacher_forcing)
            loss, _ = sequence_loss(model, attentional, batch.tgt_out, cfg.sampled_softmax, cfg.label_smoothing,
                                    shard.gold_words, shard.generator)
        optimizer.zero_grad(set_to_none=True)
        (loss * (shard.weight * shard.world_size / shard.tokens)).backward()
        loss, tokens = loss * shard.weight, shard.tokens
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    optimizer.step()
    return loss.item(), tokens


# ---------------------------------------------------------------------------------------------
# Learning rate and stopping

def learning_rate(cfg: TrainParams, step: int, total_steps: int, plateau_scale: float) -> float:
    """The rate for update `step` (from 0): linear warm-up, then the plateau halvings so far, or a
    cosine/linear decay that reaches 0 at the last planned step."""
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.lr_schedule == "plateau":
        return cfg.lr * warmup * plateau_scale
    done = min(max(step - cfg.warmup_steps, 0) / max(total_steps - cfg.warmup_steps, 1), 1.0)
    decay = 0.5 * (1 + math.cos(math.pi * done)) if cfg.lr_schedule == "cosine" else 1.0 - done
    return cfg.lr * warmup * decay


def planned_steps(cfg: TrainParams, data: ParallelData, seed: int) -> int:
    """The last step a decaying schedule aims at: every epoch's batches, or max_steps if fewer."""
    if cfg.lr_schedule == "plateau":
        return 0  # not needed
    total = sum(len(data.epoch_batches(cfg.batch_tokens, seed, e)) for e in range(cfg.epochs))
    planned = min(total, cfg.max_steps or total)
    if cfg.warmup_steps >= planned - 1:  # steps count from 0: the decay starts at step warmup_steps + 1
        log.warning("train.warmup_steps (%d) leaves the %d planned steps no room to decay%s", cfg.warmup_steps,
                    planned, ", nor to reach train.lr" if cfg.warmup_steps > planned else "")
    return planned


def smoothed(scores: list[float], window: int) -> list[float]:
    return [float(np.mean(scores[max(0, i - window + 1): i + 1])) for i in range(len(scores))]


def should_stop_early(scores: list[float], patience: int, window: int) -> bool:
    """Stop when the mean of the last `window` validation BLEUs has not beaten its best for
    `patience` validations. Greedy BLEU on ~300 verses dips by a point or two for one epoch while
    still rising (one run dipped at epoch 4, another at 8): a raw-score patience of 2 stops on
    two such dips in a row, whereas the mean of 3 keeps rising as long as each new score beats
    the one it replaces, i.e. while the trend three epochs back is still up."""
    means = smoothed(scores, window)
    if not means:
        return False
    best = int(np.argmax(means))  # the first of equal maxima: a flat mean is no improvement
    return len(means) - 1 - best >= patience


# ---------------------------------------------------------------------------------------------
# Validation

@dataclass
class ValidationSet:
    """The validation split tokenised once, for BLEU after every epoch."""

    data: ParallelData
    sources: list[list[str]]
    originals: list[list[str]]  # cased tokens, for unknown-word copying
    references: list[str]

    @classmethod
    def of(cls, data: ParallelData, src_tok: Tokenizer) -> "ValidationSet":
        frame = data.frame
        return cls(data, [s.split() for s in frame["src_tokens"]],
                   [src_tok.tokenize_cased(s) for s in frame["src"]], frame["tgt"].tolist())


@torch.no_grad()
def validation_loss(model: Seq2Seq, data: ParallelData, batch_tokens: int, device: torch.device) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for rows in data.batches(batch_tokens):
        batch = data.make_batch(rows).to(device)
        attentional, _ = model(batch.src, batch.src_len, batch.tgt_in)
        loss, n = sequence_loss(model, attentional, batch.tgt_out, 0, 0.0)
        total, tokens = total + loss.item(), tokens + n
    return total / max(tokens, 1)


def validation_bleu(translator: Translator, valid: ValidationSet) -> float:
    """Greedy BLEU on the validation split: cheap enough to run every epoch, and it is what
    a translator is judged by, so it picks the model and stops training."""
    translator.model.eval()
    outputs = translator.translate_tokens(valid.sources, beam_size=1, originals=valid.originals)
    hypotheses = [translator.tgt_tok.detokenize(words) for words, _ in outputs]
    return sacrebleu.corpus_bleu(hypotheses, [valid.references]).score


# ---------------------------------------------------------------------------------------------
# Checkpoints

# Params that only decide when training stops or how fast it runs: changing them continues the
# same training (under `lr_schedule: plateau`, `dvc exp run -S train.epochs=20` resumes from the
# last checkpoint; a decaying schedule's plan depends on epochs and max_steps, see fingerprint). `device` is
# not among them: CUDA kernels give other numbers than the CPU's. `threads` is, although another
# thread count sums in another order (last-bit differences): a resume may use other threads, and
# bit-identical runs need the same count (the default, all cores, on the same kind of machine).
# `lexicon` only adds a dictionary to model.pt after training, so it continues the same training too.
NOT_IN_FINGERPRINT = {"epochs", "max_steps", "patience", "smoothing", "max_minutes", "checkpoint_every", "threads",
                      "lexicon"}
# Everything `train` runs that can change what it computes (decode.py: validation BLEU picks the model).
CODE = ["train.py", "distributed.py", "data.py", "text.py", "embeddings.py", "decode.py", "lexicon.py", "model/*.py"]


def fingerprint(params: Params, inputs: list[Path], precision: str) -> str:
    """Which training a checkpoint belongs to: the train params that change what it computes, the
    precision it computes in here, the seed, the input files and the training code (so a bf16
    checkpoint never resumes in fp32 on a machine without bf16, or the reverse)."""
    exclude = set(NOT_IN_FINGERPRINT)
    if params.train.lr_schedule != "plateau":
        exclude -= {"epochs", "max_steps"}  # a decaying schedule is stretched to the planned length
    train = params.train.model_dump(exclude=exclude)
    digest = hashlib.sha1(json.dumps([params.seed, train, precision], sort_keys=True).encode())
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
    plateau_scale: float = 1.0  # lr factor from plateau halvings
    best_valid_loss: float = math.inf
    best_bleu: float = -1.0
    history: list[dict] = field(default_factory=list)
    run_id: str = ""


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


def save_checkpoint(path: Path, model, optimizer, progress: Progress, rng: dict | None = None,
                    extra: dict | None = None) -> None:
    """`model` is the plain module, never a DDP wrapper, so any checkpoint loads in one process.
    Under DDP, `rng` is rank 0's random state and `extra` holds every rank's and the shared
    candidate generator's."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "progress": progress.__dict__,
             "rng": rng or rng_state(), **(extra or {})}
    with storage.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, model, optimizer, device) -> Progress:
    # On the CPU, as load_distributed_checkpoint does: the random states must be CPU tensors (a
    # CUDA resume crashed converting the numpy state), and load_state_dict moves the weights and
    # Adam's moments to the parameters' device.
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    if "candidates_rng" in state:  # written under DDP: one process draws its negatives where DDP left off
        set_default_generator_state(state["candidates_rng"], device)
    return Progress(**state["progress"])


def set_default_generator_state(generator_state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(generator_state.cpu(), device)
    else:
        torch.set_rng_state(generator_state.cpu())


def default_generator_state(rng: dict, device: torch.device) -> torch.Tensor:
    """The state of `device`'s default generator in an `rng_state()`."""
    if device.type == "cuda":
        return rng["cuda"][device.index or 0].cpu()
    return rng["torch"].cpu()


def load_distributed_checkpoint(path: Path, model, optimizer, device, dist: distributed.Distributed,
                                generator: torch.Generator, seed: int) -> Progress | None:
    """Rank 0 reads the checkpoint (if any) and sends it to every rank (nodes need not share a
    disk), so all ranks resume from the same state; each takes its own random state back, or,
    from a checkpoint of another world size, rank 0 takes the saved one and the others a seed of
    their own. Returns None (on every rank) when there is no checkpoint."""
    state = None
    if dist.is_main and path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
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
    # One process draws its negatives from the default generator: a one-process checkpoint's
    # state of it is where the shared generator goes on.
    generator.set_state(state["candidates_rng"].cpu() if "candidates_rng" in state
                        else default_generator_state(state["rng"], device))
    return Progress(**state["progress"])


def keep_snapshot(run_dir: Path, model: Seq2Seq, step: int, keep: int) -> None:
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


# ---------------------------------------------------------------------------------------------
# Set-up and reports

def initial_model(params: Params, src_vocab, tgt_vocab, embeddings: Path,
                  device: torch.device) -> tuple[Seq2Seq, float, float]:
    """The untrained model with both embedding layers initialised from word2vec (the trained
    model carries its own copy); returns it with the vocabulary coverage of each side."""
    cfg = params.train
    src_init, src_cov = embedding_matrix(src_vocab, embeddings / "src.w2v", cfg.embedding_std, params.seed)
    tgt_init, tgt_cov = embedding_matrix(tgt_vocab, embeddings / "tgt.w2v", cfg.embedding_std, params.seed + 1)
    model = Seq2Seq(ModelConfig(
        src_vocab=len(src_vocab), tgt_vocab=len(tgt_vocab), emb_size=src_init.size(1), hidden_size=cfg.hidden_size,
        encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers, bidirectional=cfg.bidirectional,
        attention=cfg.attention, dropout=cfg.dropout, tie_embeddings=cfg.tie_embeddings,
        input_feeding=cfg.input_feeding))
    model.load_embeddings(src_init, tgt_init)
    if cfg.freeze_embeddings:
        model.freeze_embeddings()
    return model.to(device), src_cov, tgt_cov


def plot_learning_curve(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(history)
    fig, (ax_loss, ax_bleu) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(frame["epoch"], frame["train_loss"], marker="o", label="train")
    ax_loss.plot(frame["epoch"], frame["valid_loss"], marker="o", label="valid (full softmax)")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy per token", title="Loss")
    ax_loss.legend()
    ax_bleu.plot(frame["epoch"], frame["valid_bleu"], marker="o", color="tab:green")
    ax_bleu.set(xlabel="epoch", ylabel="BLEU", title="Validation BLEU (greedy)")
    storage.save_figure(path, fig)


def log_data_reports(mlflow, reports: Path) -> None:
    """The ingest and prepare reports (rows dropped by reason, split sizes) belong with the run."""
    for name in ("ingest", "prepare"):
        path = reports / f"{name}.json"
        if path.exists():
            mlflow.log_artifact(str(path), "data")
    if (reports / "ingest.json").exists():
        dropped = storage.read_json(reports / "ingest.json").get("dropped", {})
        mlflow.log_metrics({f"ingest_dropped_{reason}": n for reason, n in dropped.items()})


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def start_run(mlflow, progress: Progress):
    """The checkpoint's MLflow run, reopened (a run left RUNNING by a killed training is finished
    by its resume), or a new one when there is none or it was deleted; returns (run, is_new)."""
    from mlflow.exceptions import MlflowException

    if progress.run_id:
        try:
            alive = mlflow.MlflowClient().get_run(progress.run_id).info.lifecycle_stage == "active"
        except MlflowException:
            alive = False
        if alive:
            return mlflow.start_run(run_id=progress.run_id, log_system_metrics=True), False
        log.warning("the checkpoint's MLflow run %s no longer exists: logging to a new run", progress.run_id)
    return mlflow.start_run(log_system_metrics=True), True


def log_run_start(mlflow, params: Params, progress: Progress, continues: str, coverage: tuple[float, float],
                  reports: Path, prepared: Path, embeddings: Path, device: torch.device) -> None:
    mlflow.log_params(flatten(params.model_dump(by_alias=True, exclude={"ingest"})))
    mlflow.log_params({"embedding_coverage.src": round(coverage[0], 4), "embedding_coverage.tgt": round(coverage[1], 4)})
    log_data_reports(mlflow, reports)
    hashes = dvc_hashes()
    mlflow.set_tags({"git_commit": git_commit(), "dvc.prepared_md5": hashes.get(str(prepared), "unknown"),
                     "dvc.embeddings_md5": hashes.get(str(embeddings), "unknown"), "device": str(device)})
    if experiment := experiment_name():  # a `dvc exp run`: its name ties the run to `dvc exp show`
        mlflow.set_tag("dvc.experiment", experiment)
    if progress.step:  # a checkpoint whose run was deleted: say where this one takes over
        mlflow.set_tags({"resumed_from_step": progress.step, "continues_run": continues})


# ---------------------------------------------------------------------------------------------
# The loop

@dataclass
class Trainer:
    """The pieces of one training, so that the loop below reads as the algorithm."""

    params: Params
    model: Seq2Seq
    optimizer: torch.optim.Optimizer
    corpus: Corpus
    valid: ValidationSet
    translator: Translator
    progress: Progress
    run_dir: Path
    device: torch.device
    total_steps: int
    mlflow: object  # None on ranks other than 0
    tokens_per_sec: float = 0.0  # of the last stretch of updates
    dist: distributed.Distributed = distributed.SINGLE
    net: torch.nn.Module | None = None  # the DistributedDataParallel wrapper of `model` under DDP
    generator: torch.Generator | None = None  # under DDP: the negatives' generator, shared by all ranks
    # VAMOS_LOSS_LOG=path: append each update's "step<TAB>summed loss<TAB>tokens" (rank 0), e.g. to
    # compare the loss curves of one process and of DDP.
    loss_log: Path | None = field(default_factory=lambda: Path(os.environ["VAMOS_LOSS_LOG"])
                                  if os.environ.get("VAMOS_LOSS_LOG") else None)

    @property
    def cfg(self) -> TrainParams:
        return self.params.train

    def time_is_up(self) -> bool:
        """Under DDP rank 0's clock decides, for every rank (a collective: all ranks call it)."""
        if self.cfg.max_minutes is None:
            return False
        return self.dist.broadcast(self.progress.elapsed >= self.cfg.max_minutes * 60)

    def stop_reason(self) -> str | None:
        cfg, progress = self.cfg, self.progress
        if self.time_is_up():
            return "time_budget"
        if cfg.max_steps is not None and progress.step >= cfg.max_steps:
            return "max_steps"
        if progress.epoch >= cfg.epochs:
            return "epochs"
        whole_epochs = [h["valid_bleu"] for h in progress.history if h["whole_epoch"]]
        if should_stop_early(whole_epochs, cfg.patience, cfg.smoothing):
            return "early_stopping"
        return None

    def train_epoch(self, batches: list[np.ndarray], started: float) -> float:
        """Updates from the saved position to the end of the epoch, or until max_steps or the time
        budget; returns the seconds spent."""
        cfg, progress, data = self.cfg, self.progress, self.corpus.train
        (self.net or self.model).train()
        epoch_start, tokens_here = time.monotonic(), 0
        bar = tqdm(total=len(batches), initial=progress.batch, unit="batch", mininterval=5.0,
                   desc=f"epoch {progress.epoch + 1}/{cfg.epochs}", disable=not self.dist.is_main)
        for rows in batches[progress.batch:]:
            if (cfg.max_steps is not None and progress.step >= cfg.max_steps) or self.time_is_up():
                break
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(cfg, progress.step, self.total_steps, progress.plateau_scale)
            if self.dist.enabled:  # this rank's sentences of the global batch; the loss summed over ranks
                shard = self.dist.shard(rows, data.tgt, EOS_ID, self.device, self.generator)
                loss, tokens = train_step(self.model, self.optimizer, data.make_batch(shard.rows).to(self.device),
                                          cfg, self.net, shard)
                loss = self.dist.sum(loss, self.device)
            else:
                loss, tokens = train_step(self.model, self.optimizer, data.make_batch(rows).to(self.device), cfg)
            if self.loss_log is not None and self.dist.is_main:
                with open(self.loss_log, "a") as f:
                    f.write(f"{progress.step + 1}\t{loss!r}\t{tokens}\n")
            progress.step, progress.batch = progress.step + 1, progress.batch + 1
            progress.epoch_loss, progress.epoch_tokens = progress.epoch_loss + loss, progress.epoch_tokens + tokens
            progress.elapsed = time.monotonic() - started
            tokens_here += tokens
            bar.update(1)
            if progress.step % 20 == 0:
                rate = tokens_here / max(time.monotonic() - epoch_start, 1e-9)
                bar.set_postfix(loss=f"{progress.epoch_loss / progress.epoch_tokens:.3f}", tok_s=f"{rate:,.0f}")
            if progress.step % cfg.checkpoint_every == 0:
                self.checkpoint()
        bar.close()
        self.tokens_per_sec = tokens_here / max(time.monotonic() - epoch_start, 1e-9)
        return time.monotonic() - epoch_start

    def checkpoint(self) -> None:
        """last.pt; under DDP a collective: rank 0 writes it with every rank's random state."""
        path = self.run_dir / "last.pt"
        if not self.dist.enabled:
            save_checkpoint(path, self.model, self.optimizer, self.progress)
            return
        states = self.dist.gather(rng_state())
        if self.dist.is_main:
            save_checkpoint(path, self.model, self.optimizer, self.progress, rng=states[0],
                            extra={"rng_ranks": states, "candidates_rng": self.generator.get_state()})

    def validate(self, batches_in_epoch: int) -> None:
        """Rank 0 scores the model while the others wait at a barrier; then every rank takes rank
        0's progress (history, best score, plateau scale, epoch), so the stopping rules, the
        best model and the schedule are rank 0's decisions on every rank; then last.pt."""
        if self.dist.is_main:
            self.score(batches_in_epoch)
        if self.dist.enabled:
            self.dist.barrier()
            self.progress.__dict__.update(self.dist.broadcast(self.progress.__dict__))
        self.checkpoint()

    def score(self, batches_in_epoch: int) -> dict:
        """Score the model now, keep the best and the snapshots, and at the end of a whole epoch
        (never a cut one: a part of an epoch is a noisier, smaller measurement) let the plateau
        schedule act on the validation loss."""
        progress, cfg = self.progress, self.cfg
        whole = progress.batch >= batches_in_epoch
        valid_loss = validation_loss(self.model, self.corpus.valid, cfg.batch_tokens, self.device)
        valid_bleu = validation_bleu(self.translator, self.valid)
        record = {"epoch": round(progress.epoch + progress.batch / batches_in_epoch, 3), "step": progress.step,
                  "whole_epoch": whole, "train_loss": progress.epoch_loss / max(progress.epoch_tokens, 1),
                  "valid_loss": valid_loss, "valid_ppl": math.exp(min(valid_loss, 50)), "valid_bleu": valid_bleu,
                  "lr": self.optimizer.param_groups[0]["lr"], "tokens_per_sec": self.tokens_per_sec}
        progress.history.append(record)
        self.mlflow.log_metrics({k: v for k, v in record.items() if k not in ("step", "whole_epoch")},
                               step=progress.step)
        log.info("epoch %.2f (step %d): train loss %.3f, valid loss %.3f, valid BLEU %.2f, %.0f tok/s, lr %.2g",
                 record["epoch"], progress.step, record["train_loss"], valid_loss, valid_bleu,
                 record["tokens_per_sec"], record["lr"])
        if valid_bleu > progress.best_bleu:
            progress.best_bleu = valid_bleu
            save_model(self.run_dir / "best.pt", self.model, self.corpus.src_vocab, self.corpus.tgt_vocab,
                       *self.translator_tokenizers)
        if cfg.average_checkpoints:
            keep_snapshot(self.run_dir, self.model, progress.step, cfg.average_checkpoints)
        if whole:
            if valid_loss < progress.best_valid_loss:
                progress.best_valid_loss = valid_loss
            else:  # halve the rate once validation loss stops falling
                progress.plateau_scale *= cfg.lr_decay
            progress.epoch, progress.batch, progress.epoch_loss, progress.epoch_tokens = progress.epoch + 1, 0, 0.0, 0
        return record

    @property
    def translator_tokenizers(self) -> tuple[Tokenizer, Tokenizer]:
        return self.translator.src_tok, self.translator.tgt_tok

    def run(self) -> str:
        """Train until a stopping rule holds; every stretch of updates ends with a validation, so
        a killed run that resumes after its last update still validates it."""
        started = time.monotonic() - self.progress.elapsed
        while True:
            batches = self.corpus.train.epoch_batches(self.cfg.batch_tokens, self.params.seed, self.progress.epoch)
            validated = bool(self.progress.history) and self.progress.history[-1]["step"] == self.progress.step
            reason = self.stop_reason()
            if reason and validated:
                return reason
            if not reason:
                self.train_epoch(batches, started)
            self.validate(len(batches))
            self.progress.elapsed = time.monotonic() - started

    def final_model(self, path: Path) -> float | None:
        """Write the model that evaluate and register see: the best validation, or the average of
        the last snapshots (then scored on validation too, returned). With train.lexicon, the
        dictionary of that model's attention over the whole training split goes into the file
        (no subsample: a teacher-forced pass without the output projection; batches in a fixed
        length order, so the same model gives the same dictionary)."""
        if not self.cfg.average_checkpoints and not self.cfg.lexicon:
            with storage.atomic_path(path) as tmp:
                shutil.copyfile(self.run_dir / "best.pt", tmp)
            return None
        # Training is over; last.pt keeps its state.
        if self.cfg.average_checkpoints:
            self.model.load_state_dict(averaged_weights(self.run_dir))
        else:
            best = torch.load(self.run_dir / "best.pt", map_location=self.device, weights_only=True)
            self.model.load_state_dict(best["state_dict"])
        lexicon = None
        if self.cfg.lexicon:
            lexicon = build_lexicon(self.model, self.corpus.train, self.cfg.batch_tokens, device=self.device)
            log.info("lexicon: translations for %d source words", len(lexicon.translations))
        save_model(path, self.model, self.corpus.src_vocab, self.corpus.tgt_vocab, *self.translator_tokenizers,
                   lexicon=lexicon)
        return validation_bleu(self.translator, self.valid) if self.cfg.average_checkpoints else None


def train(params: Params, prepared: Path = storage.PREPARED, embeddings: Path = storage.EMBEDDINGS,
          out_dir: Path = storage.SEQ2SEQ, reports: Path = storage.REPORTS,
          checkpoints: Path = storage.CHECKPOINTS) -> dict:
    """Train in this process, or, under torchrun (WORLD_SIZE set), as one rank of a data-parallel
    training (pipeline.distributed): every rank returns rank 0's summary."""
    cfg = params.train
    torch.manual_seed(params.seed)
    random.seed(params.seed)
    np.random.seed(params.seed)
    dist, device = distributed.init(pick_device(cfg.device))
    summary = _train(params, dist, device, prepared, embeddings, out_dir, reports, checkpoints)
    dist.close()  # only after success: after a failure torchrun stops the other ranks
    return summary


def _train(params: Params, dist: distributed.Distributed, device: torch.device, prepared: Path, embeddings: Path,
           out_dir: Path, reports: Path, checkpoints: Path) -> dict:
    cfg = params.train
    if device.type == "cpu":
        cores = os.cpu_count() or 1
        # `threads` is per process; 0 is all cores in one process, a fair share of them per rank under DDP.
        torch.set_num_threads(cfg.threads or (distributed.threads_per_rank(cores, dist.local_world_size)
                                              if dist.enabled else cores))
    corpus = load_corpus(prepared)
    src_tok, tgt_tok = tokenizers(params, prepared)
    model, src_cov, tgt_cov = initial_model(params, corpus.src_vocab, corpus.tgt_vocab, embeddings, device)
    log.info("model: %s parameters; embedding coverage src %.1f%%, tgt %.1f%%",
             f"{sum(p.numel() for p in model.parameters()):,}", 100 * src_cov, 100 * tgt_cov)
    net, generator = None, None
    if dist.enabled:
        # The negatives' generator starts where one process's draws would (same on every rank);
        # dropout and teacher forcing then draw from a stream of each rank's own.
        generator = distributed.shared_generator(device)
        if not dist.is_main:
            torch.manual_seed(distributed.rank_seed(params.seed, dist.rank))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    inputs = [prepared / f for f in ("train.parquet", "valid.parquet", "vocab.src.json", "vocab.tgt.json")]
    run_dir = checkpoints / fingerprint(params, inputs + sorted(embeddings.glob("*.w2v")), training_precision(cfg, device))
    progress = Progress()
    if dist.enabled:
        progress = load_distributed_checkpoint(run_dir / "last.pt", model, optimizer, device, dist, generator,
                                               params.seed) or progress
    elif (run_dir / "last.pt").exists():
        progress = load_checkpoint(run_dir / "last.pt", model, optimizer, device)
    if progress.step:
        log.info("resuming from %s: epoch %d, batch %d, step %d", run_dir / "last.pt", progress.epoch + 1,
                 progress.batch, progress.step)
    if dist.enabled:  # after the checkpoint: DDP starts every rank from rank 0's weights
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    if not dist.is_main:  # rank 0 alone logs, validates and writes the model and reports
        trainer = Trainer(params, model, optimizer, corpus, ValidationSet.of(corpus.valid, src_tok),
                          Translator(model, src_tok, tgt_tok, corpus.src_vocab, corpus.tgt_vocab, device), progress,
                          run_dir, device, planned_steps(cfg, corpus.train, params.seed), None, dist=dist, net=net,
                          generator=generator)
        trainer.progress.__dict__.update(dist.broadcast(None))  # the MLflow run id
        trainer.run()
        dist.barrier()  # rank 0 writes the final model and the reports
        return dist.broadcast(None)

    mlflow = mlflow_setup(params.registry.experiment)
    run, is_new = start_run(mlflow, progress)
    previous_run, progress.run_id = progress.run_id, run.info.run_id
    try:
        if is_new:
            log_run_start(mlflow, params, progress, previous_run, (src_cov, tgt_cov), reports, prepared, embeddings,
                          device)
            if dist.enabled:
                mlflow.log_params({"distributed.world_size": dist.world_size})
        storage.write_json(storage.RUN_FILE, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id})
        trainer = Trainer(params, model, optimizer, corpus, ValidationSet.of(corpus.valid, src_tok),
                          Translator(model, src_tok, tgt_tok, corpus.src_vocab, corpus.tgt_vocab, device), progress,
                          run_dir, device, planned_steps(cfg, corpus.train, params.seed), mlflow, dist=dist, net=net,
                          generator=generator)
        if dist.enabled:
            dist.broadcast({"run_id": progress.run_id})
        stop_reason = trainer.run()
        averaged_bleu = trainer.final_model(out_dir / "model.pt")
        mlflow.set_tag("model_md5", storage.file_md5(out_dir / "model.pt"))  # how evaluate/register find this run
        summary = write_reports(trainer, stop_reason, averaged_bleu, (src_cov, tgt_cov), reports)
    except BaseException:
        mlflow.end_run("FAILED")  # a later `vamos train` resumes it from the checkpoint
        raise
    mlflow.end_run()
    if dist.enabled:
        dist.barrier()
        dist.broadcast(summary)
    return summary


def write_reports(trainer: Trainer, stop_reason: str, averaged_bleu: float | None, coverage: tuple[float, float],
                  reports: Path) -> dict:
    progress, device, mlflow = trainer.progress, trainer.device, trainer.mlflow
    batches = len(trainer.corpus.train.epoch_batches(trainer.cfg.batch_tokens, trainer.params.seed, progress.epoch))
    machine_dependent = stop_reason == "time_budget"
    if machine_dependent:
        log.warning("!" * 80 + "\nTRAINING WAS STOPPED BY THE WALL-CLOCK BUDGET (train.max_minutes) after %d steps:\n"
                    "this model depends on this machine's speed; another machine trains another model.\n"
                    "Stop by train.epochs or train.max_steps for a reproducible result.\n" + "!" * 80, progress.step)
    summary = {
        "best_valid_bleu": progress.best_bleu,
        "averaged_valid_bleu": averaged_bleu,
        "epochs": round(progress.epoch + progress.batch / batches, 3),
        "epochs_completed": progress.epoch,
        "steps": progress.step,
        "embedding_coverage": {"src": round(coverage[0], 4), "tgt": round(coverage[1], 4)},
        "stopped_by": stop_reason,
        "machine_dependent": machine_dependent,
        "device": str(device),
        "precision": training_precision(trainer.cfg, device),
    }
    # Timings go to a file of their own that dvc.lock does not hash (a top-level metric in
    # dvc.yaml): the same training on a faster machine must give the same dvc.lock.
    speed = {"train_minutes": round(progress.elapsed / 60, 2),
             "tokens_per_sec": round(float(np.mean([h["tokens_per_sec"] for h in progress.history])), 1),
             "peak_memory_mb": round(peak_memory_mb(device), 1)}
    mlflow.log_metrics({"best_valid_bleu": progress.best_bleu, "train_minutes": speed["train_minutes"],
                        "peak_memory_mb": speed["peak_memory_mb"], "steps": progress.step})
    if averaged_bleu is not None:
        mlflow.log_metric("averaged_valid_bleu", averaged_bleu)
    mlflow.set_tags({"stopped_by": stop_reason, "machine_dependent": str(machine_dependent).lower()})
    # No timings in the curve: it is a DVC output, and its md5 in dvc.lock must not depend on the
    # machine's speed (train_speed.json carries them; so does MLflow).
    curve = pd.DataFrame(progress.history).drop(columns=["tokens_per_sec"])
    with storage.atomic_path(reports / "learning_curve.csv") as tmp:
        curve.to_csv(tmp, index=False, float_format="%.4f")
    plot_learning_curve(progress.history, reports / "plots" / "learning_curve.png")
    mlflow.log_artifact(str(reports / "plots" / "learning_curve.png"), "plots")
    storage.write_json(reports / "train.json", summary)
    storage.write_json(reports / "train_speed.json", speed)
    log.info("training stopped by %s after %d steps (%.2f epochs, %.1f minutes); best valid BLEU %.2f", stop_reason,
             progress.step, summary["epochs"], progress.elapsed / 60, progress.best_bleu)
    return summary
