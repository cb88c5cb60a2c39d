"""Training and decoding speed on the prepared data: target tokens/s, sentences/s, peak memory.

    python benchmarks/throughput.py --steps 30 --set train.hidden_size=256

Run it from a checkout where `dvc repro` has made data/prepared and models/embeddings.
It prints figures; it asserts nothing (timings belong in a benchmark, not a test)."""
from __future__ import annotations

import time

import torch
import typer
import yaml

from pipeline.config import Params, load_params
from pipeline.data import ParallelData, load_split, load_vocabs
from pipeline.decode import Translator
from pipeline.embeddings import embedding_matrix
from pipeline.storage import EMBEDDINGS
from pipeline.text import Tokenizer
from pipeline.train import build_model, peak_memory_mb, pick_device, sequence_loss


def with_overrides(params: Params, overrides: list[str]) -> Params:
    raw = params.model_dump(by_alias=True)
    for item in overrides:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    return Params.model_validate(raw)


def main(steps: int = 30, decode_sentences: int = 128, set: list[str] = typer.Option([], "--set")) -> None:
    params = with_overrides(load_params(), set)
    cfg = params.train
    device = pick_device(cfg.device)
    torch.manual_seed(params.seed)
    src_vocab, tgt_vocab = load_vocabs()
    data = ParallelData(load_split("train"), src_vocab, tgt_vocab)
    src_init, _ = embedding_matrix(src_vocab, EMBEDDINGS / "src.w2v", 0)
    tgt_init, _ = embedding_matrix(tgt_vocab, EMBEDDINGS / "tgt.w2v", 1)
    model = build_model(cfg, src_init.size(1), src_vocab, tgt_vocab)
    model.load_embeddings(src_init, tgt_init)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    batches = data.batches(cfg.batch_tokens, seed=params.seed)[: steps + 3]
    tokens, start = 0, None
    for i, rows in enumerate(batches):
        if i == 3:  # warm-up steps are not timed
            if device.type == "cuda":
                torch.cuda.synchronize()
            tokens, start = 0, time.perf_counter()
        batch = data.make_batch(rows).to(device)
        with amp:
            attentional, _ = model(batch.src, batch.src_len, batch.tgt_in, cfg.teacher_forcing)
            loss, n = sequence_loss(model, attentional, batch.tgt_out, cfg.sampled_softmax, cfg.label_smoothing)
        optimizer.zero_grad()
        (loss / n).backward()
        optimizer.step()
        tokens += n
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"device {device}, threads {torch.get_num_threads()}, hidden {cfg.hidden_size}, "
          f"sampled softmax {cfg.sampled_softmax}, batch_tokens {cfg.batch_tokens}")
    print(f"train: {tokens / seconds:,.0f} target tokens/s over {steps} steps "
          f"({sum(len(t) + 1 for t in data.tgt):,} target tokens per epoch -> "
          f"{sum(len(t) + 1 for t in data.tgt) / (tokens / seconds) / 60:.1f} min/epoch)")
    frame = load_split("test").head(decode_sentences)
    translator = Translator(model, Tokenizer(params.prepare.src_lang, params.prepare.lowercase_src),
                            Tokenizer(params.prepare.tgt_lang, params.prepare.lowercase_tgt), src_vocab, tgt_vocab, device)
    sources = [s.split() for s in frame["src_tokens"]]
    for beam in (1, params.evaluate.beam_size):
        start = time.perf_counter()
        translator.translate_tokens(sources, beam_size=beam, batch_size=params.evaluate.batch_size)
        print(f"decode beam {beam}: {len(sources) / (time.perf_counter() - start):,.1f} sentences/s")
    print(f"peak memory: {peak_memory_mb(device):,.0f} MiB")


if __name__ == "__main__":
    typer.run(main)
