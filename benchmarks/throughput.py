"""Training and decoding speed on the prepared data: target tokens/s, sentences/s, peak memory.

    python benchmarks/throughput.py --steps 30 --set train.hidden_size=512

Run from a checkout where `dvc repro` has made data/prepared and models/embeddings. It prints
figures and asserts nothing: timings belong in a benchmark, not in a test."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import typer

sys.path.insert(0, str(Path(__file__).parent))
from common import params_with, setup  # noqa: E402

from pipeline.decode import Translator  # noqa: E402
from pipeline.train import peak_memory_mb, tokenizers, train_step  # noqa: E402

WARMUP = 3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(steps: int = 30, decode_sentences: int = 128, set: list[str] = typer.Option([], "--set")) -> None:
    params = params_with(set)
    cfg = params.train
    model, data, valid, src_vocab, tgt_vocab, device = setup(params)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    tokens, start = 0, time.perf_counter()
    for i, rows in enumerate(data.batches(cfg.batch_tokens, seed=params.seed)[: steps + WARMUP]):
        if i == WARMUP:
            synchronize(device)
            tokens, start = 0, time.perf_counter()
        tokens += train_step(model, optimizer, data.make_batch(rows).to(device), cfg)[1]
    synchronize(device)
    rate = tokens / (time.perf_counter() - start)
    per_epoch = sum(len(t) + 1 for t in data.tgt)
    print(f"device {device}, threads {torch.get_num_threads()}, hidden {cfg.hidden_size}, "
          f"sampled softmax {cfg.sampled_softmax}, batch_tokens {cfg.batch_tokens}, amp {cfg.amp}")
    print(f"train: {rate:,.0f} target tokens/s over {steps} steps; {per_epoch:,} target tokens an epoch "
          f"-> {per_epoch / rate / 60:.1f} min/epoch")
    translator = Translator(model, *tokenizers(params), src_vocab, tgt_vocab, device)
    sources = [s.split() for s in valid["src_tokens"].head(decode_sentences)]
    for beam in (1, params.evaluate.beam_size):
        start = time.perf_counter()
        translator.translate_tokens(sources, beam_size=beam, batch_size=params.evaluate.batch_size)
        synchronize(device)
        print(f"decode beam {beam}: {len(sources) / (time.perf_counter() - start):,.1f} sentences/s")
    print(f"peak memory: {peak_memory_mb(device):,.0f} MiB")


if __name__ == "__main__":
    typer.run(main)
