"""The training: the model set-up, one teacher-forced update, and the loop that repeats
"stop? train a stretch, measure, act on the measurement" until a stopping rule holds.

Training stops after `epochs` or `max_steps` updates, so the same seed and data give the same
weights on every run; `max_minutes` is only a safety net, and says so loudly when it fires. The
pieces live in modules of their own: the loss (loss.py), the learning rate and early stopping
(schedule.py), checkpoints and exact resume (checkpoint.py), validation (validation.py), the
MLflow run (runlog.py), the reports (training_report.py) and data parallelism (distributed.py)."""
from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline import checkpoint, distributed, storage
from pipeline.checkpoint import (CHECKPOINT_FILE, Progress, averaged_weights, fingerprint, keep_snapshot,
                                 training_inputs)
from pipeline.config import Params, TrainParams
from pipeline.data import Batch, BatchPlan, Corpus, load_corpus, prefetched
from pipeline.decode import Translator
from pipeline.device import autocast, pick_device, precision_name
from pipeline.embeddings import embedding_matrix
from pipeline.lexicon import build_lexicon
from pipeline.loss import sequence_loss
from pipeline.model import ModelConfig, Seq2Seq, save_model
from pipeline.runlog import NullRunLog, RunLog
from pipeline.schedule import learning_rate, planned_steps, should_stop_early
from pipeline.text import EOS_ID, UNK_ID, tokenizers
from pipeline.training_report import write_reports
from pipeline.validation import ValidationSet, validation_bleu, validation_loss

__all__ = ["initial_model", "drop_words", "train_step", "train"]

log = logging.getLogger(__name__)


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
        input_feeding=cfg.input_feeding, right_to_left=cfg.right_to_left))
    model.load_embeddings(src_init, tgt_init)
    if cfg.freeze_embeddings:
        model.freeze_embeddings()
    return model.to(device), src_cov, tgt_cov


def drop_words(ids: torch.Tensor, rate: float) -> torch.Tensor:
    """Word dropout: each word (not <pad>, <sos> or <eos>) becomes <unk> with probability `rate`,
    so the model cannot lean on every input word and learns to translate around unknown ones.
    At rate 0 it draws nothing, so the random streams (and the weights) are those of a run without it."""
    if rate == 0.0:
        return ids
    drop = (torch.rand(ids.shape, device=ids.device) < rate) & (ids > EOS_ID)
    return ids.masked_fill(drop, UNK_ID)


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
        with autocast(cfg.amp, batch.src.device):
            attentional, _ = model(batch.src, batch.src_len, batch.tgt_in, cfg.teacher_forcing)
            loss, tokens = sequence_loss(model, attentional, batch.tgt_out, cfg.sampled_softmax, cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        (loss / tokens).backward()
    else:
        with autocast(cfg.amp, batch.src.device):
            attentional, _ = net(batch.src, batch.src_len, batch.tgt_in, cfg.teacher_forcing)
            loss, _ = sequence_loss(model, attentional, batch.tgt_out, cfg.sampled_softmax, cfg.label_smoothing,
                                    shard.gold_words, shard.generator)
        optimizer.zero_grad(set_to_none=True)
        (loss * (shard.weight * shard.world_size / shard.tokens)).backward()
        loss, tokens = loss * shard.weight, shard.tokens
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    optimizer.step()
    return loss.item(), tokens


@dataclass
class Trainer:
    """The pieces of one training, so that the loop reads as the algorithm. Under DDP every rank
    runs the loop; rank 0 alone measures, logs and writes files, and the others take its progress."""

    params: Params
    model: Seq2Seq
    optimizer: torch.optim.Optimizer
    corpus: Corpus
    valid: ValidationSet
    translator: Translator
    progress: Progress
    run_dir: Path
    device: torch.device
    total_steps: int  # what a decaying schedule plans for
    runlog: NullRunLog
    dist: distributed.Distributed = distributed.SINGLE
    net: torch.nn.Module | None = None  # the DistributedDataParallel wrapper of `model` under DDP
    generator: torch.Generator | None = None  # under DDP: the negatives' generator, shared by all ranks
    # VAMOS_LOSS_LOG=path: append each update's "step<TAB>summed loss<TAB>tokens" (rank 0), e.g. to
    # compare the loss curves of one process and of DDP.
    loss_log: Path | None = field(default_factory=lambda: Path(os.environ["VAMOS_LOSS_LOG"])
                                  if os.environ.get("VAMOS_LOSS_LOG") else None)
    plans: dict[int, BatchPlan] = field(default_factory=dict)  # the current epoch's batch plan

    @property
    def cfg(self) -> TrainParams:
        return self.params.train

    def run(self) -> str:
        """Train until a stopping rule holds, and return its name. Every stretch of updates ends
        with a measurement, so a killed run that resumes after its last update still measures it."""
        progress, cfg = self.progress, self.cfg
        started = time.monotonic() - progress.elapsed
        while True:
            batches = self.epoch_plan()
            reason = self.stop_reason()
            if reason and progress.validated:
                return reason
            speed = None if reason else self.train_stretch(batches, started)
            if self.dist.is_main:
                record = self.measure(len(batches), speed)
                if record["valid_bleu"] > progress.best_bleu:
                    progress.best_bleu = record["valid_bleu"]
                    self.save_model(self.run_dir / "best.pt")
                if cfg.average_checkpoints:
                    keep_snapshot(self.run_dir, self.model, progress.step, cfg.average_checkpoints)
                if record["whole_epoch"]:  # never a cut epoch: a part is a noisier, smaller measurement
                    if record["valid_loss"] < progress.best_valid_loss:
                        progress.best_valid_loss = record["valid_loss"]
                    else:  # the plateau schedule halves the rate once validation loss stops falling
                        progress.plateau_scale *= cfg.lr_decay
                    progress.next_epoch()
            self.share_progress()
            self.checkpoint()
            progress.elapsed = time.monotonic() - started

    def epoch_plan(self) -> BatchPlan:
        """This epoch's batches, planned once (validate_every measures several times an epoch)."""
        epoch = self.progress.epoch
        if epoch not in self.plans:
            self.plans = {epoch: self.corpus.train.epoch_batches(self.cfg.batch_tokens, self.params.seed, epoch)}
        return self.plans[epoch]

    def counts(self, record: dict) -> bool:
        """Whether a validation counts for early stopping: an epoch's end or a `validate_every`
        point; never one where max_steps, the time budget or a resume cut the run elsewhere (a
        cut run, raised and continued, must give the uncut run's history)."""
        every = self.cfg.validate_every
        return record["whole_epoch"] or bool(every and record["step"] % every == 0)

    def validation_due(self) -> bool:
        """A `validate_every` point not yet measured (also the one a resume may owe)."""
        every, progress = self.cfg.validate_every, self.progress
        return bool(every and progress.step and progress.step % every == 0 and not progress.validated)

    def stop_reason(self) -> str | None:
        cfg, progress = self.cfg, self.progress
        if self.time_is_up():
            return "time_budget"
        if cfg.max_steps is not None and progress.step >= cfg.max_steps:
            return "max_steps"
        if progress.epoch >= cfg.epochs:
            return "epochs"
        counted = [h["valid_bleu"] for h in progress.history if self.counts(h)]
        if should_stop_early(counted, cfg.patience, cfg.smoothing):
            return "early_stopping"
        return None

    def time_is_up(self) -> bool:
        """Under DDP rank 0's clock decides, for every rank (a collective: all ranks call it)."""
        if self.cfg.max_minutes is None:
            return False
        return self.dist.broadcast(self.progress.elapsed >= self.cfg.max_minutes * 60)

    def train_stretch(self, batches: BatchPlan, started: float) -> float:
        """Updates from the saved position to the end of the epoch, or until max_steps, the time
        budget or a `validate_every` point; returns their target tokens per second. The next
        batch is loaded in a background thread while the model computes this one."""
        cfg, progress = self.cfg, self.progress
        (self.net or self.model).train()
        stretch_start, tokens_here = time.monotonic(), 0
        last = stretch_start
        bar = tqdm(total=len(batches), initial=progress.batch, unit="batch", mininterval=5.0,
                   desc=f"epoch {progress.epoch + 1}/{cfg.epochs}", disable=not self.dist.is_main)
        upcoming = (batches[i] for i in range(progress.batch, len(batches)))
        for _, loaded in prefetched(upcoming, self.load):
            if (cfg.max_steps is not None and progress.step >= cfg.max_steps) or self.time_is_up() \
                    or self.validation_due():
                break
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(cfg, progress.step, self.total_steps, progress.plateau_scale)
            loss, tokens = self.update(*loaded)
            if self.loss_log is not None and self.dist.is_main:
                with open(self.loss_log, "a") as f:
                    f.write(f"{progress.step + 1}\t{loss!r}\t{tokens}\n")
            now = time.monotonic()
            progress.step, progress.batch = progress.step + 1, progress.batch + 1
            progress.epoch_loss, progress.epoch_tokens = progress.epoch_loss + loss, progress.epoch_tokens + tokens
            progress.tokens_trained, progress.update_seconds = progress.tokens_trained + tokens, \
                progress.update_seconds + now - last
            progress.elapsed, last = now - started, now
            tokens_here += tokens
            bar.update(1)
            if progress.step % 20 == 0:
                bar.set_postfix(loss=f"{progress.epoch_loss / progress.epoch_tokens:.3f}",
                                tok_s=f"{tokens_here / max(now - stretch_start, 1e-9):,.0f}")
            if progress.step % cfg.checkpoint_every == 0:
                self.checkpoint()
        bar.close()
        return tokens_here / max(time.monotonic() - stretch_start, 1e-9)

    def load(self, rows: np.ndarray) -> tuple[Batch, distributed.Shard | None]:
        """The batch of `rows` as tensors (under DDP this rank's shard of it): no random draws, so
        it may run in the background thread."""
        data = self.corpus.train
        if not self.dist.enabled:
            return data.make_batch(rows), None
        shard = self.dist.shard(rows, data.tgt, EOS_ID, self.device, self.generator)
        return data.make_batch(shard.rows), shard

    def update(self, batch: Batch, shard: distributed.Shard | None) -> tuple[float, int]:
        """One update on `batch`; under DDP on this rank's `shard`, with the loss summed over the ranks."""
        if shard is None:
            return train_step(self.model, self.optimizer, batch.to(self.device), self.cfg)
        loss, tokens = train_step(self.model, self.optimizer, batch.to(self.device), self.cfg, self.net, shard)
        return self.dist.sum(loss, self.device), tokens

    def measure(self, batches_in_epoch: int, speed: float | None) -> dict:
        """Validation loss and BLEU now, added to the history, logged; `speed` is the target
        tokens/s of the stretch just trained (None when the measurement was owed by a resume)."""
        progress = self.progress
        valid_loss = validation_loss(self.model, self.corpus.valid, self.cfg.batch_tokens, self.device)
        valid_bleu = validation_bleu(self.translator, self.valid)
        record = {"epoch": round(progress.epoch + progress.batch / batches_in_epoch, 3), "step": progress.step,
                  "whole_epoch": progress.batch >= batches_in_epoch,
                  "train_loss": progress.epoch_loss / max(progress.epoch_tokens, 1),
                  "valid_loss": valid_loss, "valid_ppl": math.exp(min(valid_loss, 50)), "valid_bleu": valid_bleu,
                  "lr": self.optimizer.param_groups[0]["lr"], "tokens_per_sec": speed}
        progress.history.append(record)
        self.runlog.metrics({k: v for k, v in record.items() if k not in ("step", "whole_epoch") and v is not None},
                            step=progress.step)
        log.info("epoch %.2f (step %d): train loss %.3f, valid loss %.3f, valid BLEU %.2f, %s tok/s, lr %.2g",
                 record["epoch"], progress.step, record["train_loss"], valid_loss, valid_bleu,
                 "-" if speed is None else f"{speed:,.0f}", record["lr"])
        return record

    def share_progress(self) -> None:
        """Under DDP every rank takes rank 0's progress (history, best score, plateau scale, epoch):
        the stopping rules, the best model and the schedule are rank 0's decisions on every rank."""
        if self.dist.enabled:
            self.dist.barrier()
            self.progress.__dict__.update(self.dist.broadcast(self.progress.__dict__))

    def checkpoint(self) -> None:
        checkpoint.save(self.run_dir / CHECKPOINT_FILE, self.model, self.optimizer, self.progress, self.dist,
                        self.generator)

    def save_model(self, path: Path, lexicon=None) -> None:
        save_model(path, self.model, self.corpus.src_vocab, self.corpus.tgt_vocab, self.translator.src_tok,
                   self.translator.tgt_tok, lexicon=lexicon)

    def final_model(self, path: Path) -> float | None:
        """Write the model that evaluate and register see: the best validation, or the average of
        the last snapshots (then scored on validation too, returned). With train.lexicon, the
        dictionary of that model's attention over the training split goes into the file (over a
        seeded sample of `lexicon_pairs` of a larger split: a teacher-forced pass without the output
        projection; batches in a fixed length order, so the same model gives the same dictionary).
        last.pt keeps its state."""
        if not self.cfg.average_checkpoints and not self.cfg.lexicon:
            with storage.atomic_path(path) as tmp:
                shutil.copyfile(self.run_dir / "best.pt", tmp)
            return None
        if self.cfg.average_checkpoints:
            self.model.load_state_dict(averaged_weights(self.run_dir))
        else:
            best = torch.load(self.run_dir / "best.pt", map_location=self.device, weights_only=True)
            self.model.load_state_dict(best["state_dict"])
        lexicon = None
        if self.cfg.lexicon:
            lexicon = build_lexicon(self.model, self.corpus.train, self.cfg.batch_tokens, device=self.device,
                                    max_pairs=self.cfg.lexicon_pairs, seed=self.params.seed)
            log.info("lexicon: translations for %d source words", len(lexicon.translations))
        self.save_model(path, lexicon)
        return validation_bleu(self.translator, self.valid) if self.cfg.average_checkpoints else None


def train(params: Params, prepared: Path = storage.PREPARED, embeddings: Path = storage.EMBEDDINGS,
          out_dir: Path = storage.SEQ2SEQ, reports: Path = storage.REPORTS,
          checkpoints: Path = storage.CHECKPOINTS) -> dict:
    """Train in this process, or, under torchrun (WORLD_SIZE set), as one rank of a data-parallel
    training (pipeline.distributed): every rank returns rank 0's summary."""
    torch.manual_seed(params.seed)
    random.seed(params.seed)
    np.random.seed(params.seed)
    dist, device = distributed.init(pick_device(params.train.device))
    summary = _train(params, dist, device, prepared, embeddings, out_dir, reports, checkpoints)
    dist.close()  # only after success: after a failure torchrun stops the other ranks
    return summary


def _train(params: Params, dist: distributed.Distributed, device: torch.device, prepared: Path, embeddings: Path,
           out_dir: Path, reports: Path, checkpoints: Path) -> dict:
    cfg = params.train
    if device.type == "cpu":  # `threads` is per process; 0: all cores, a fair share of them per DDP rank
        torch.set_num_threads(cfg.threads or distributed.threads_per_rank(os.cpu_count() or 1, dist.local_world_size))
    corpus = load_corpus(prepared, right_to_left=cfg.right_to_left)
    src_tok, tgt_tok = tokenizers(params, prepared)
    model, src_cov, tgt_cov = initial_model(params, corpus.src_vocab, corpus.tgt_vocab, embeddings, device)
    log.info("model: %s parameters; embedding coverage src %.1f%%, tgt %.1f%%",
             f"{sum(p.numel() for p in model.parameters()):,}", 100 * src_cov, 100 * tgt_cov)
    generator = None
    if dist.enabled:
        # The negatives' generator starts where one process's draws would (same on every rank);
        # dropout and teacher forcing then draw from a stream of each rank's own.
        generator = distributed.shared_generator(device)
        if not dist.is_main:
            torch.manual_seed(distributed.rank_seed(params.seed, dist.rank))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    run_dir = checkpoints / fingerprint(params, training_inputs(prepared, embeddings),
                                        precision_name(cfg.amp, device), device)
    progress = checkpoint.resume(run_dir / CHECKPOINT_FILE, model, optimizer, device, params.seed, dist,
                                 generator) or Progress()
    if progress.step:
        log.info("resuming from %s: epoch %d, batch %d, step %d", run_dir / CHECKPOINT_FILE, progress.epoch + 1,
                 progress.batch, progress.step)
    net = None
    if dist.enabled:  # after the checkpoint: DDP starts every rank from rank 0's weights
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    runlog = RunLog.open(params, progress.run_id) if dist.is_main else NullRunLog()
    checkpoint_run, progress.run_id = progress.run_id, dist.broadcast(runlog.run_id)
    summary = None
    try:
        runlog.describe(params, device, (src_cov, tgt_cov), dist.world_size if dist.enabled else None, prepared,
                        embeddings, reports)
        if runlog.is_new and progress.step:  # a checkpoint whose run was deleted: where this one takes over
            runlog.tags({"resumed_from_step": progress.step, "continues_run": checkpoint_run})
        trainer = Trainer(params, model, optimizer, corpus, ValidationSet.of(corpus.valid, src_tok),
                          Translator(model, src_tok, tgt_tok, corpus.src_vocab, corpus.tgt_vocab, device), progress,
                          run_dir, device, planned_steps(cfg, corpus.train), runlog, dist, net, generator)
        stop_reason = trainer.run()
        if dist.is_main:  # rank 0 alone writes the final model and the reports
            averaged_bleu = trainer.final_model(out_dir / "model.pt")
            runlog.tags({"model_md5": storage.file_md5(out_dir / "model.pt")})  # how evaluate/register find this run
            summary = write_reports(progress, cfg, device, len(trainer.epoch_plan()), stop_reason, averaged_bleu, (src_cov, tgt_cov),
                                    runlog, reports)
    except BaseException:
        runlog.finish(failed=True)  # a later `vamos train` resumes it from the checkpoint
        raise
    runlog.finish()
    dist.barrier()
    return dist.broadcast(summary)
