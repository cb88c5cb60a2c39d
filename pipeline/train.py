"""The training loop: teacher forcing, masked (sampled-)softmax loss, Adam, early stopping on
validation BLEU, a wall-clock budget, and checkpoints that resume exactly after a crash."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import sacrebleu
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline import storage
from pipeline.config import Params, TrainParams
from pipeline.data import ParallelData, load_split, load_vocabs
from pipeline.decode import Translator
from pipeline.embeddings import embedding_matrix
from pipeline.model import ModelConfig, Seq2Seq, save_model
from pipeline.text import PAD_ID, Tokenizer
from pipeline.tracking import dvc_hashes, flatten, git_commit, mlflow_setup

log = logging.getLogger(__name__)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def sequence_loss(model: Seq2Seq, attentional: torch.Tensor, targets: torch.Tensor, negatives: int,
                  label_smoothing: float) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over real (non-pad) target positions, all time steps at once.

    In training with `negatives` > 0 the softmax runs over the batch's own target words plus
    that many random ones (sampled softmax), which is most of the saving on a CPU; evaluation
    always uses the full vocabulary."""
    mask = targets != PAD_ID
    hidden, gold = attentional[mask], targets[mask]
    weight, bias = model.generator.weight, model.generator.bias
    vocab = weight.size(0)
    if model.training and 0 < negatives < vocab:
        noise = torch.randint(4, vocab, (negatives,), device=gold.device)
        candidates = torch.unique(torch.cat([gold, noise]))
        lookup = torch.full((vocab,), -1, dtype=torch.long, device=gold.device)
        lookup[candidates] = torch.arange(candidates.numel(), device=gold.device)
        logits = F.linear(hidden, weight[candidates], bias[candidates])
        gold = lookup[gold]
    else:
        logits = F.linear(hidden, weight, bias)
    loss = F.cross_entropy(logits.float(), gold, reduction="sum", label_smoothing=label_smoothing)
    return loss, int(gold.numel())


def autocast(cfg: TrainParams, device: torch.device):
    """bf16 mixed precision on CUDA (no loss scaling needed); plain fp32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")


def train_step(model: Seq2Seq, optimizer, batch, cfg: TrainParams) -> tuple[float, int]:
    """One teacher-forced update; returns the summed loss and the number of target tokens."""
    with autocast(cfg, batch.src.device):
        attentional, _ = model(batch.src, batch.src_len, batch.tgt_in, cfg.teacher_forcing)
        loss, tokens = sequence_loss(model, attentional, batch.tgt_out, cfg.sampled_softmax, cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    (loss / tokens).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    optimizer.step()
    return loss.item(), tokens


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


def validation_bleu(translator: Translator, frame: pd.DataFrame) -> float:
    """Greedy BLEU on the validation split: cheap enough to run every epoch, and it is what
    a translator is judged by, so it picks the model and stops training."""
    translator.model.eval()
    sources = [s.split() for s in frame["src_tokens"]]
    originals = [translator.src_tok.tokenize_cased(s) for s in frame["src"]]
    outputs = translator.translate_tokens(sources, beam_size=1, originals=originals)
    hypotheses = [translator.tgt_tok.detokenize(words) for words, _ in outputs]
    return sacrebleu.corpus_bleu(hypotheses, [frame["tgt"].tolist()]).score


# Stopping criteria do not change what training computes, so raising them resumes the same
# training (`dvc exp run -S train.epochs=20` continues from the last checkpoint).
STOPPING_PARAMS = {"epochs", "patience", "max_minutes", "checkpoint_every"}


def fingerprint(params: Params, paths: list[Path]) -> str:
    """Which training a checkpoint belongs to: the train params, the seed and the input files."""
    train = params.train.model_dump(exclude=STOPPING_PARAMS)
    digest = hashlib.sha1(json.dumps([params.seed, train], sort_keys=True).encode())
    for path in sorted(paths):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class Progress:
    """Everything besides weights that an exact resume needs."""

    epoch: int = 0
    batch: int = 0  # next batch within the epoch
    step: int = 0
    elapsed: float = 0.0  # training seconds so far, over all resumes
    best_bleu: float = -1.0
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    run_id: str = ""


def save_checkpoint(path: Path, model, optimizer, scheduler, progress: Progress) -> None:
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "progress": progress.__dict__, "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    with storage.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, model, optimizer, scheduler, device) -> Progress:
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    return Progress(**state["progress"])


def tokenizers(params: Params) -> tuple[Tokenizer, Tokenizer]:
    cfg = params.prepare
    return Tokenizer(cfg.src_lang, cfg.lowercase_src), Tokenizer(cfg.tgt_lang, cfg.lowercase_tgt)


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
        attention=cfg.attention, dropout=cfg.dropout, tie_embeddings=cfg.tie_embeddings))
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
    ax_loss.plot(frame["epoch"], frame["train_loss"], marker="o", label="train (sampled softmax)")
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


def train(params: Params, prepared: Path = storage.PREPARED, embeddings: Path = storage.EMBEDDINGS,
          out_dir: Path = storage.SEQ2SEQ, reports: Path = storage.REPORTS,
          checkpoints: Path = storage.CHECKPOINTS) -> dict:
    cfg = params.train
    torch.manual_seed(params.seed)
    device = pick_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    src_vocab, tgt_vocab = load_vocabs(prepared)
    train_data = ParallelData(load_split("train", prepared), src_vocab, tgt_vocab)
    valid_frame = load_split("valid", prepared)
    valid_data = ParallelData(valid_frame, src_vocab, tgt_vocab)
    src_tok, tgt_tok = tokenizers(params)
    model, src_cov, tgt_cov = initial_model(params, src_vocab, tgt_vocab, embeddings, device)
    log.info("model: %s parameters; embedding coverage src %.1f%%, tgt %.1f%%",
             f"{sum(p.numel() for p in model.parameters()):,}", 100 * src_cov, 100 * tgt_cov)

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.lr_decay, patience=0)
    inputs = [prepared / f for f in ("train.parquet", "valid.parquet", "vocab.src.json", "vocab.tgt.json")]
    code = Path(__file__).parent
    sources = [code / "train.py", code / "data.py", *sorted((code / "model").glob("*.py"))]
    run_dir = checkpoints / fingerprint(params, inputs + sorted(embeddings.glob("*.w2v")) + sources)
    checkpoint, best_model = run_dir / "last.pt", run_dir / "best.pt"
    progress = Progress()
    if checkpoint.exists():
        progress = load_checkpoint(checkpoint, model, optimizer, scheduler, device)
        log.info("resuming from %s: epoch %d, batch %d, step %d", checkpoint, progress.epoch + 1,
                 progress.batch, progress.step)

    mlflow = mlflow_setup(params.registry.experiment)
    run = mlflow.start_run(run_id=progress.run_id or None, log_system_metrics=True)
    progress.run_id = run.info.run_id
    if progress.step == 0:
        mlflow.log_params(flatten(params.model_dump(by_alias=True, exclude={"ingest"})))
        mlflow.log_params({"embedding_coverage.src": round(src_cov, 4), "embedding_coverage.tgt": round(tgt_cov, 4)})
        log_data_reports(mlflow, reports)
        hashes = dvc_hashes()
        mlflow.set_tags({"git_commit": git_commit(), "dvc.prepared_md5": hashes.get(str(prepared), "unknown"),
                         "dvc.embeddings_md5": hashes.get(str(embeddings), "unknown"), "device": str(device)})
    storage.write_json(out_dir / "run.json", {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id})

    translator = Translator(model, src_tok, tgt_tok, src_vocab, tgt_vocab, device)
    budget = cfg.max_minutes * 60
    started = time.monotonic() - progress.elapsed
    while progress.epoch < cfg.epochs and progress.bad_epochs < cfg.patience and progress.elapsed < budget:
        batches = train_data.batches(cfg.batch_tokens, seed=params.seed + progress.epoch)
        model.train()
        epoch_loss, epoch_tokens, epoch_start = 0.0, 0, time.monotonic()
        bar = tqdm(batches, initial=progress.batch, total=len(batches), unit="batch",
                   desc=f"epoch {progress.epoch + 1}/{cfg.epochs}", mininterval=5.0)
        for rows in batches[progress.batch:]:
            loss, tokens = train_step(model, optimizer, train_data.make_batch(rows).to(device), cfg)
            progress.step += 1
            progress.batch += 1
            epoch_loss, epoch_tokens = epoch_loss + loss, epoch_tokens + tokens
            bar.update(1)
            if progress.step % 20 == 0:
                rate = epoch_tokens / max(time.monotonic() - epoch_start, 1e-9)
                bar.set_postfix(loss=f"{epoch_loss / epoch_tokens:.3f}", tok_s=f"{rate:,.0f}")
            progress.elapsed = time.monotonic() - started
            if progress.step % cfg.checkpoint_every == 0:
                save_checkpoint(checkpoint, model, optimizer, scheduler, progress)
            if progress.elapsed > budget:
                break
        bar.close()
        train_seconds = time.monotonic() - epoch_start
        valid_loss = validation_loss(model, valid_data, cfg.batch_tokens, device)
        valid_bleu = validation_bleu(translator, valid_frame)
        record = {"epoch": progress.epoch + 1, "train_loss": epoch_loss / max(epoch_tokens, 1),
                  "valid_loss": valid_loss, "valid_ppl": math.exp(min(valid_loss, 50)), "valid_bleu": valid_bleu,
                  "lr": optimizer.param_groups[0]["lr"], "tokens_per_sec": epoch_tokens / max(train_seconds, 1e-9)}
        progress.history.append(record)
        mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])
        log.info("epoch %d: train loss %.3f, valid loss %.3f, valid BLEU %.2f, %.0f tok/s, lr %.2g",
                 record["epoch"], record["train_loss"], valid_loss, valid_bleu, record["tokens_per_sec"], record["lr"])
        if valid_bleu > progress.best_bleu:
            progress.best_bleu, progress.bad_epochs = valid_bleu, 0
            save_model(best_model, model, src_vocab, tgt_vocab, src_tok, tgt_tok)
        else:
            progress.bad_epochs += 1
        scheduler.step(valid_loss)  # halve the rate once validation loss stops falling
        progress.epoch, progress.batch = progress.epoch + 1, 0
        save_checkpoint(checkpoint, model, optimizer, scheduler, progress)

    stop_reason = ("time_budget" if progress.elapsed >= budget else
                   "early_stopping" if progress.bad_epochs >= cfg.patience else "epochs")
    # The best model lives beside the checkpoint, so a resumed or re-run training still has it.
    with storage.atomic_path(out_dir / "model.pt") as tmp:
        shutil.copyfile(best_model, tmp)

    summary = {
        "best_valid_bleu": progress.best_bleu,
        "epochs": progress.epoch,
        "steps": progress.step,
        "train_minutes": round(progress.elapsed / 60, 2),
        "tokens_per_sec": round(float(np.mean([h["tokens_per_sec"] for h in progress.history])), 1),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "embedding_coverage": {"src": round(src_cov, 4), "tgt": round(tgt_cov, 4)},
        "stopped_by": stop_reason,
        "device": str(device),
    }
    mlflow.log_metrics({"best_valid_bleu": progress.best_bleu, "train_minutes": summary["train_minutes"],
                        "peak_memory_mb": summary["peak_memory_mb"]})
    mlflow.set_tag("stopped_by", stop_reason)
    history = pd.DataFrame(progress.history)
    with storage.atomic_path(reports / "learning_curve.csv") as tmp:
        history.to_csv(tmp, index=False, float_format="%.4f")
    plot_learning_curve(progress.history, reports / "plots" / "learning_curve.png")
    mlflow.log_artifact(str(reports / "plots" / "learning_curve.png"), "plots")
    storage.write_json(reports / "train.json", summary)
    mlflow.end_run()
    log.info("training stopped by %s after %.1f minutes; best valid BLEU %.2f", stop_reason,
             progress.elapsed / 60, progress.best_bleu)
    return summary
