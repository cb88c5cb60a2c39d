"""Validation BLEU after each epoch for a setting, without MLflow or checkpoints: how defaults
are chosen by measurement.

    python benchmarks/quality.py --epochs 4 --set train.embedding_std=0.1
(run it once per setting to compare)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import typer

sys.path.insert(0, str(Path(__file__).parent))
from common import params_with, setup  # noqa: E402

from pipeline.decode import Translator  # noqa: E402
from pipeline.train import tokenizers, train_step, validation_bleu  # noqa: E402


def main(epochs: int = 3, set: list[str] = typer.Option([], "--set")) -> None:
    params = params_with(set)
    cfg = params.train
    model, data, valid, src_vocab, tgt_vocab, device = setup(params)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    translator = Translator(model, *tokenizers(params), src_vocab, tgt_vocab, device)
    print(f"setting: {' '.join(set) or 'params.yaml'} on {device}")
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        loss = tokens = 0
        for rows in data.batches(cfg.batch_tokens, seed=params.seed + epoch - 1):
            step_loss, step_tokens = train_step(model, optimizer, data.make_batch(rows).to(device), cfg)
            loss, tokens = loss + step_loss, tokens + step_tokens
        bleu = validation_bleu(translator, valid)
        print(f"epoch {epoch}: train loss {loss / tokens:.3f}, valid BLEU {bleu:.2f}, "
              f"{(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    typer.run(main)
