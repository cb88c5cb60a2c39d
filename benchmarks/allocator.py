"""Training speed and memory under each memory allocator: the C library's (with freed memory kept,
as `vamos train` does on glibc), tcmalloc (what `vamos train` runs under), and jemalloc where the
system has it. Each runs in a process of its own, one after the other, on the same batches.

    python benchmarks/allocator.py --steps 340

Needs a checkout where `dvc repro` has made data/prepared and models/embeddings. Prints figures
and asserts nothing. `--trim N` adds glibc runs that give free memory back every N steps
(malloc_trim), which shows how much of glibc's peak is free memory it keeps."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys
import time
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from pipeline import allocator  # noqa: E402

LIBRARIES = {"tcmalloc": allocator.TCMALLOC, "jemalloc": "jemalloc"}


def run_steps(steps: int, trim_every: int) -> None:
    """In the child: train `steps` steps as `vamos train` would; print tokens/s and the peak RSS in MiB."""
    import torch
    from common import params_with, setup

    from pipeline.device import peak_memory_mb
    from pipeline.train import train_step

    params = params_with([])
    model, data, *_, device = setup(params)  # keeps freed memory on glibc, as the train stage does
    optimizer = torch.optim.Adam(model.parameters(), lr=params.train.lr)
    model.train()
    libc = ctypes.CDLL(None)
    tokens, start = 0, time.perf_counter()
    for i, rows in enumerate(data.batches(params.train.batch_tokens, seed=params.seed)[:steps]):
        tokens += train_step(model, optimizer, data.make_batch(rows).to(device), params.train)[1]
        if trim_every and (i + 1) % trim_every == 0:
            libc.malloc_trim(0)
    print(f"{tokens / (time.perf_counter() - start):.1f} {peak_memory_mb(device):.1f}")


def child(name: str, steps: int, trim_every: int) -> tuple[float, float] | None:
    """(tokens/s, peak RSS MiB of the child) under allocator `name`, or None where it is not installed."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {allocator.CHOICE_VARIABLE: "system"}
    if name in LIBRARIES:
        library = ctypes.util.find_library(LIBRARIES[name])
        if library is None:
            return None
        env["LD_PRELOAD"] = library
    command = [sys.executable, __file__, "--steps", str(steps), "--trim", str(trim_every), "--child"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    rate, peak = done.stdout.split()[-2:]
    return float(rate), float(peak)


def main(steps: int = typer.Option(150, help="training steps per allocator"),
         trim: list[int] = typer.Option([], help="also glibc trimmed every N steps (repeat)"),
         child_run: bool = typer.Option(False, "--child", hidden=True)) -> None:
    if child_run:
        run_steps(steps, trim[0] if trim else 0)
        return
    from pipeline.device import cpu_info

    cpu, isa = cpu_info()
    print(f"host: {cpu} ({', '.join(isa)}); {steps} default training steps per run")
    print(f"{'allocator':<28} {'tokens/s':>9} {'peak RSS':>10}")
    runs = [("glibc, freed memory kept", "system", 0), *((f"glibc, trimmed every {n}", "system", n) for n in trim),
            ("tcmalloc", "tcmalloc", 0), ("jemalloc", "jemalloc", 0)]
    for label, name, every in runs:
        result = child(name, steps, every)
        if result is None:
            print(f"{label:<28} {'not installed':>20}")
        else:
            print(f"{label:<28} {result[0]:>9,.0f} {result[1] / 1024:>8.2f} GB", flush=True)


if __name__ == "__main__":
    typer.run(main)
