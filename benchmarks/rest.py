"""REST serving speed: requests/s and p50/p95 latency of `mlflow models serve` on 127.0.0.1 under
1, 4 and 16 concurrent clients, one sentence per request, a bounded number of requests per level;
and the server's peak memory (the largest VmHWM, peak resident set, of its processes).

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python benchmarks/rest.py --requests 200
    python benchmarks/rest.py --model models:/vamos-en-es/3 --clients 1 --clients 8 --workers 2

With --in-process N it starts no server: it times the model's pyfunc `predict` in this process, in
requests of N sentences in split order, beside its decoder alone (pre-tokenised) on the same
requests and on the whole split sorted by length, as benchmarks/throughput.py's batched row decodes
it. The first gap is the text path (tokenising, limits, detokenising); the second, the requests'
mix of short and long sentences, which one padded batch decodes at the pace of its longest.

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


def cpu_rate(work, sentences: int, repeats: int) -> float:
    """Sentences per second of CPU time, the fastest of `repeats` runs (as timeit)."""
    fastest = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        work()
        fastest = min(fastest, time.process_time() - start)
    return sentences / fastest


def in_process(model: str, pool: list[str], request: int, repeats: int) -> None:
    import mlflow
    import torch

    pyfunc = mlflow.pyfunc.load_model(model)
    served = pyfunc.unwrap_python_model()
    translator = served.translator
    sources, originals = translator.src_tok.from_cased_all(translator.src_tok.words(text) for text in pool)
    spans = [slice(start, start + request) for start in range(0, len(pool), request)]

    def decode(rows: slice, beam: int):  # translate_tokens sorts by length, then batches
        return translator.translate_tokens(sources[rows], beam_size=beam, batch_size=request,
                                           originals=originals[rows], **served.search)

    print(f"torch threads {torch.get_num_threads()}; search {served.search}; sentences/s of CPU time, best of {repeats}")
    print(f"| search | pyfunc predict, requests of {request} | decoder alone, same requests | decoder alone, "
          f"whole split by length |\n|---|---:|---:|---:|")
    for beam in sorted({1, served.default_beam}):
        rates = [cpu_rate(lambda: [pyfunc.predict(pool[rows], params={"beam_size": beam}) for rows in spans], len(pool), repeats),
                 cpu_rate(lambda: [decode(rows, beam) for rows in spans], len(pool), repeats),
                 cpu_rate(lambda: decode(slice(None), beam), len(pool), repeats)]
        print(f"| {'greedy' if beam == 1 else f'beam {beam}'} | " + " | ".join(f"{r:.1f}" for r in rates) + " |")


def main(
    model: str = typer.Option("models:/vamos-en-es@champion", help="what `mlflow models serve -m` serves"),
    requests_per_level: int = typer.Option(200, "--requests", min=1, help="requests at each concurrency level"),
    clients: list[int] = typer.Option([1, 4, 16], "--clients", help="concurrency levels"),
    workers: int = typer.Option(1, help="uvicorn workers (mlflow's default is 1)"),
    split: Path = typer.Option(PREPARED / "test.parquet", help="sentences to send, one per request"),
    in_process_request: int = typer.Option(0, "--in-process", min=0,
                                           help="no server: time pyfunc predict in requests of this many sentences"),
    repeats: int = typer.Option(3, min=1, help="--in-process: time each decoding this many times, report the fastest"),
) -> None:
    offline_environment()
    pool, source = sentences(split)
    if in_process_request:
        print(f"model {model}; {len(pool)} sentences from {source}")
        return in_process(model, pool, in_process_request, repeats)
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
