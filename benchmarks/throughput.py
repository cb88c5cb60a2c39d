"""Training and decoding speed: target tokens/s, sentences/s, peak memory.

    python benchmarks/throughput.py --steps 30 --set train.hidden_size=512
    python benchmarks/throughput.py --decode-only --max-len-ratio 1.5 --max-len-ratio 0.8

Decoding: a table of sentences/s for greedy and beam search, one sentence at a time and batched,
over a split (the test split by default), with its mean source and output lengths. Side by side:
    git show <commit>:pipeline/decode.py > /tmp/old_decode.py
    python benchmarks/throughput.py --decode-only --decoder /tmp/old_decode.py --lexicon models/seq2seq/model.pt
times an older decode.py (in bf16 where it has a `precision`), this one in fp32 and in bf16, and
both with a lexical shortlist, back to back in each row; each figure is the fastest of --repeats
runs. On a shared machine add `--set train.threads=1` and read the CPU-time figures.

Training needs a checkout where `dvc repro` has made data/prepared and models/embeddings. Decoding
falls back to a random model of the configured size (which never stops early: bound it with
--max-len-ratio, or let it stop with --eos-bias) and synthetic sentences, and says so. It prints
figures and asserts nothing: timings belong in a benchmark, not in a test."""
from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import time
from pathlib import Path

import torch
import typer

sys.path.insert(0, str(Path(__file__).parent))
from common import decoding_setup, params_with, setup  # noqa: E402

from pipeline import storage  # noqa: E402
from pipeline.device import has_bf16, peak_memory_mb  # noqa: E402
from pipeline.text import EOS_ID, tokenizers  # noqa: E402
from pipeline.train import train_step  # noqa: E402

WARMUP = 3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def benchmark_training(params, steps: int) -> None:
    cfg = params.train
    model, data, _, _, _, device = setup(params)
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
    per_epoch = data.target_tokens()
    print(f"device {device}, threads {torch.get_num_threads()}, hidden {cfg.hidden_size}, "
          f"sampled softmax {cfg.sampled_softmax}, batch_tokens {cfg.batch_tokens}, amp {cfg.amp}")
    print(f"train: {rate:,.0f} target tokens/s over {steps} steps; {per_epoch:,} target tokens an epoch "
          f"-> {per_epoch / rate / 60:.1f} min/epoch")
    batches = [data.make_batch(rows).to(device) for rows in data.batches(cfg.batch_tokens, seed=params.seed)[:3]]
    per_token = flops_per_token(model, optimizer, batches, cfg)
    bf16 = cfg.amp and has_bf16(device)
    peak = matmul_peak(device, torch.bfloat16 if bf16 else torch.float32)
    print(f"model: {per_token / 1e6:,.1f} MFLOP per target token (a training step, counted on {len(batches)} "
          f"batches) -> {per_token * rate / 1e9:,.1f} GFLOP/s; {'bf16' if bf16 else 'fp32'} matmul peak "
          f"(torch.mm {PEAK_SIZE}x{PEAK_SIZE}, this run) {peak / 1e9:,.1f} GFLOP/s -> {per_token * rate / peak:.0%} of it")


PEAK_SIZE = 4096


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> float:
    """FLOP/s of torch.mm on large square matrices: what this machine's matrix units can do."""
    a, b = (torch.randn(PEAK_SIZE, PEAK_SIZE, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        torch.mm(a, b)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    synchronize(device)
    return 2 * PEAK_SIZE ** 3 * repeats / (time.perf_counter() - start)


def flops_per_token(model, optimizer, batches, cfg) -> float:
    """Matrix FLOPs of a training step (forward and backward) per target token, counted by
    FlopCounterMode. oneDNN's fused LSTM kernels are opaque to it, so the count runs with oneDNN
    off, where the LSTM is made of the matrix products it counts; the timing above ran with it on."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = tokens = 0
    with torch.backends.mkldnn.flags(enabled=False):
        for batch in batches:
            with FlopCounterMode(display=False) as counter:
                tokens += train_step(model, optimizer, batch, cfg)[1]
            flops += counter.get_total_flops()
    return flops / tokens


def translator_class(decoder: str):
    """pipeline.decode's Translator, or the one in another copy of decode.py (for before/after)."""
    if decoder == CURRENT:
        from pipeline.decode import Translator

        return Translator
    spec = importlib.util.spec_from_file_location(f"decode_{abs(hash(decoder))}", decoder)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.Translator


def spread_subset(items: list, count: int) -> list:
    """`count` items spread evenly over the list, so a subset keeps its length distribution."""
    step = max(len(items) / count, 1.0)
    return [items[int(i * step)] for i in range(min(count, len(items)))]


def time_decoding(translate, sources, device, repeats: int) -> tuple[float, float, float]:
    """(sentences per second of wall time, per second of this process's CPU time, mean output
    length in tokens) of `translate(sources)`, the fastest of `repeats` runs for each clock (as
    timeit: slower runs measure what else the machine was doing). On a machine others share, CPU
    time (with one thread, --set train.threads=1) still measures the work; wall time the wait too."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        outputs = translate(sources)
        synchronize(device)
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - cpu_start)
    return len(sources) / wall, len(sources) / cpu, sum(len(words) for words, _ in outputs) / len(outputs)


def benchmark_decoding(params, data: Path, split: str, ratios: list[float], batch1_sentences: int,
                       decoders: list[str], lexicon_path: Path | None, eos_bias: float = 0.0,
                       repeats: int = 3) -> None:
    """One row per (max_len_ratio, search, batch size); one sentences/s column per decoder, timed
    back to back so that each row's figures share the machine's load."""
    model, sources, src_vocab, tgt_vocab, device, notes = decoding_setup(params, data, split)
    if eos_bias:
        with torch.no_grad():
            model.generator.bias[EOS_ID] += eos_bias
        notes.append(f"<eos> logit raised by {eos_bias}, so that sentences end at various lengths, as a trained "
                     "model's do (+2.4 on the random model: greedy outputs of 26 tokens on average, as the references)")
    lexicon = load_lexicon(lexicon_path) if lexicon_path else None
    # name -> (translator, its decoding options); the oldest decoders know no `precision`.
    variants = {}
    for name in decoders:
        translator = translator_class(name)(model, *tokenizers(params), src_vocab, tgt_vocab, device)
        knows_precision = "precision" in inspect.signature(translator.translate_tokens).parameters
        variants[name] = (translator, {"precision": "bfloat16"} if knows_precision else {})
    variants[CURRENT][1]["precision"] = "float32"
    current = variants[CURRENT][0]
    variants["bf16"] = (current, {"precision": "bfloat16"})
    if lexicon is not None:
        with_lexicon = translator_class(CURRENT)(model, *tokenizers(params), src_vocab, tgt_vocab, device, lexicon=lexicon)
        variants["shortlist"] = (with_lexicon, {"shortlist": True, "precision": "float32"})
        variants["shortlist + bf16"] = (with_lexicon, {"shortlist": True, "precision": "bfloat16"})
    batch, beam = params.evaluate.batch_size, params.evaluate.beam_size
    print(f"device {device}, threads {torch.get_num_threads()}; {split}: {len(sources)} sentences, "
          f"{sum(map(len, sources)) / len(sources):.1f} source tokens on average")
    for note in notes:
        print(f"note: {note}")
    print("columns: " + "; ".join(f"{i + 1} = {name}" for i, name in enumerate(variants)))
    for translator, options in variants.values():  # warm-up
        translator.translate_tokens(sources[:8], beam_size=beam, batch_size=8, **options)
    print("| max_len_ratio | search | batch | sentences | mean source len | mean output len | "
          + " | ".join(f"sentences/s ({i + 1}) wall, CPU" for i in range(len(variants))) + " | load |")
    print("|---" * (7 + len(variants)) + "|")
    for ratio in ratios:
        for search_beam in (1, beam):
            for size in (1, batch):
                subset = sources if size > 1 else spread_subset(sources, batch1_sentences)
                rates, out_lengths = [], {}
                for name, (translator, options) in variants.items():
                    wall, cpu, out_lengths[name] = time_decoding(
                        lambda s: translator.translate_tokens(s, beam_size=search_beam, batch_size=size,
                                                              max_len_ratio=ratio, **options),
                        subset, device, repeats)
                    rates.append(f"{wall:,.1f}, {cpu:,.1f}")
                out_len = out_lengths[CURRENT]  # of pipeline/decode.py, fp32, without the shortlist
                search = "greedy" if search_beam == 1 else f"beam {search_beam}"
                print(f"| {ratio} | {search} | {size} | {len(subset)} | {sum(map(len, subset)) / len(subset):.1f} | "
                      f"{out_len:.1f} | {' | '.join(rates)} | {os.getloadavg()[0]:.1f} |", flush=True)
    print(f"peak memory: {peak_memory_mb(device):,.0f} MiB")


def load_lexicon(path: Path):
    """The lexicon stored in a model.pt, read as the pipeline reads it."""
    from pipeline.model import load_translator

    lexicon = load_translator(path).lexicon
    if lexicon is None:
        raise typer.BadParameter(f"{path} holds no lexicon (train with train.lexicon: true)")
    return lexicon


CURRENT = "pipeline/decode.py"


def main(steps: int = 30, decode_only: bool = typer.Option(False, help="skip the training benchmark"),
         train_only: bool = typer.Option(False, help="skip the decoding benchmark"),
         data: Path = typer.Option(storage.PREPARED, help="prepared data (vocabularies and splits)"),
         split: str = "test", max_len_ratio: list[float] = typer.Option([], help="default: evaluate.max_len_ratio"),
         batch1_sentences: int = typer.Option(100, help="sentences decoded one at a time"),
         decoder: list[str] = typer.Option([], help="another decode.py to time beside pipeline/decode.py"),
         lexicon: Path = typer.Option(None, help="a model.pt with a lexicon: also time the shortlist"),
         eos_bias: float = typer.Option(0.0, help="add to the <eos> logit (a random model that stops)"),
         repeats: int = typer.Option(3, min=1, help="time each decoding this many times and report the fastest"),
         set: list[str] = typer.Option([], "--set")) -> None:
    params = params_with(set)
    if not decode_only:
        benchmark_training(params, steps)
    if not train_only:
        benchmark_decoding(params, data, split, max_len_ratio or [params.evaluate.max_len_ratio], batch1_sentences,
                           [*decoder, CURRENT], lexicon, eos_bias, repeats)


if __name__ == "__main__":
    typer.run(main)
