"""REST serving speed: requests/s and p50/p95 latency of `mlflow models serve` on 127.0.0.1 under
1, 4 and 16 concurrent clients, one sentence per request, a bounded number of requests per level;
and the server's peak memory (the largest VmHWM, peak resident set, of its processes).

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python benchmarks/rest.py --requests 200
    python benchmarks/rest.py --model models:/vamos-en-es/3 --clients 1 --clients 8 --workers 2

Sentences come from the test split's sources (data/prepared/test.parquet), or a few built-in ones
when this checkout has no prepared data. It prints figures and asserts nothing."""
from __future__ import annotations

import itertools
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests
import typer

from pipeline.serving import running_server
from pipeline.storage import PREPARED
from pipeline.tracking import offline_environment

FALLBACK = ["Let's go.", "In the beginning God created the heavens and the earth.",
            "The red dog sleeps.", "Jesus wept.", "And God said, Let there be light: and there was light."]


def sentences(split_file: Path) -> tuple[list[str], str]:
    if split_file.exists():
        import pandas as pd

        return pd.read_parquet(split_file)["src"].tolist(), str(split_file)
    return FALLBACK, "built-in sentences (no prepared test split here)"


def one_request(session: requests.Session, url: str, sentence: str) -> float:
    start = time.perf_counter()
    response = session.post(url, json={"inputs": [sentence]}, timeout=120)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed


def load_level(url: str, clients: int, pool: list[str], total: int) -> dict:
    """`total` requests spread over `clients` threads, each with its own connection."""
    work = list(itertools.islice(itertools.cycle(pool), total))
    shares = [work[i::clients] for i in range(clients)]

    def client(share: list[str]) -> list[float]:
        with requests.Session() as session:
            return [one_request(session, url, s) for s in share]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as executor:
        latencies = sorted(itertools.chain.from_iterable(executor.map(client, shares)))
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": total, "rps": total / wall,
            "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]}


def peak_rss_mib(server) -> float:
    """The largest peak resident set among the server's processes (the worker holds the model)."""
    peaks = []
    for process in [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]:
        status = Path(f"/proc/{process.pid}/status").read_text()
        peaks += [int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
    return max(peaks)


def main(
    model: str = typer.Option("models:/vamos-en-es@champion", help="what `mlflow models serve -m` serves"),
    requests_per_level: int = typer.Option(200, "--requests", min=1, help="requests at each concurrency level"),
    clients: list[int] = typer.Option([1, 4, 16], "--clients", help="concurrency levels"),
    workers: int = typer.Option(1, help="uvicorn workers (mlflow's default is 1)"),
    split: Path = typer.Option(PREPARED / "test.parquet", help="sentences to send, one per request"),
) -> None:
    offline_environment()
    pool, source = sentences(split)
    print(f"model {model}; {len(pool)} sentences from {source}, mean {statistics.mean(len(s.split()) for s in pool):.1f} "
          f"words; {requests_per_level} requests per level; {workers} worker(s); {psutil.cpu_count()} CPUs")
    with running_server(model, workers=workers) as (base, server):
        url = f"{base}/invocations"
        load_level(url, 1, pool, min(10, requests_per_level))  # warm-up: first requests load lazily
        print("| clients | requests | requests/s | p50 ms | p95 ms |\n|---:|---:|---:|---:|---:|")
        for level in clients:
            r = load_level(url, level, pool, requests_per_level)
            print(f"| {r['clients']} | {r['requests']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} |")
        print(f"server peak RSS: {peak_rss_mib(server):.0f} MiB")


if __name__ == "__main__":
    typer.run(main)
