"""Validation BLEU against training minutes for a setting, without MLflow or checkpoints: how
defaults are chosen by measurement. It runs the training loop's own pieces (loader, schedule,
loss, validation), validating every `--every` steps and at the end.

    python benchmarks/quality.py --minutes 10 --every 100 --set train.input_feeding=false
    python benchmarks/quality.py --epochs 3 --set train.hidden_size=512
(run the compared settings one after another on the same machine, so that its noise shows)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import typer

sys.path.insert(0, str(Path(__file__).parent))
from common import params_with, setup  # noqa: E402

from pipeline.data import ParallelData  # noqa: E402
from pipeline.decode import Translator  # noqa: E402
from pipeline.schedule import learning_rate, planned_steps  # noqa: E402
from pipeline.train import train_step  # noqa: E402
from pipeline.validation import ValidationSet, validation_bleu  # noqa: E402
from pipeline.text import tokenizers  # noqa: E402


def main(epochs: int = 3, minutes: float = 0.0, steps: int = 0, every: int = 0,
         set: list[str] = typer.Option([], "--set")) -> None:
    """Stops after --epochs, or earlier at --steps or --minutes of training (validation excluded)."""
    params = params_with(set)
    cfg = params.train
    model, data, valid_frame, src_vocab, tgt_vocab, device = setup(params)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    src_tok, tgt_tok = tokenizers(params)
    translator = Translator(model, src_tok, tgt_tok, src_vocab, tgt_vocab, device)
    valid = ValidationSet.of(ParallelData.from_frame(valid_frame, src_vocab, tgt_vocab), src_tok)
    total = steps or planned_steps(cfg, data)
    print(f"setting: {' '.join(set) or 'params.yaml'} on {device}, {torch.get_num_threads()} threads; "
          f"stop at {epochs} epochs, {steps or '-'} steps, {minutes or '-'} min")
    print("| step | epoch | train min | train loss | tokens/s | valid BLEU | load |")
    print("|---|---|---|---|---|---|---|")
    step, seconds, loss, tokens, reported = 0, 0.0, 0.0, 0, -1

    def report(epoch: float) -> None:
        nonlocal reported
        if reported == step:
            return
        reported = step
        bleu = validation_bleu(translator, valid)
        print(f"| {step} | {epoch:.2f} | {seconds / 60:.1f} | {loss / max(tokens, 1):.3f} | "
              f"{tokens / max(seconds, 1e-9):,.0f} | {bleu:.2f} | {os.getloadavg()[0]:.1f} |", flush=True)

    for epoch in range(epochs):
        batches = data.epoch_batches(cfg.batch_tokens, params.seed, epoch)
        model.train()
        for i, rows in enumerate(batches):
            if (steps and step >= steps) or (minutes and seconds >= minutes * 60):
                return report(epoch + i / len(batches))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step, total, 1.0)  # plateau halvings are not simulated
            start = time.perf_counter()
            step_loss, step_tokens = train_step(model, optimizer, data.make_batch(rows).to(device), cfg)
            seconds += time.perf_counter() - start
            step, loss, tokens = step + 1, loss + step_loss, tokens + step_tokens
            if every and step % every == 0:
                report(epoch + (i + 1) / len(batches))
                model.train()
        if not every:
            report(epoch + 1.0)
    report(float(epochs))


if __name__ == "__main__":
    typer.run(main)
