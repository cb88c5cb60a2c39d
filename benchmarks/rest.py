"""REST serving speed: requests/s and p50/p95 latency of `mlflow models serve` on 127.0.0.1 under
1, 4 and 16 concurrent clients, one sentence per request, a bounded number of requests per level;
and the server's peak memory (the largest VmHWM, peak resident set, of its processes).

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python benchmarks/rest.py --requests 200
    python benchmarks/rest.py --model models:/vamos-en-es/3 --clients 1 --clients 8 --workers 2

With --soak-minutes M it runs one long level instead: `--clients` threads (16 by default) for M
minutes, each sending a mix of good requests (one sentence), over-long ones (a sentence past
serve.max_sentence_tokens, too many sentences) and malformed ones (broken JSON, a number or a null
for a sentence, a beam size out of range). It reports requests/s and p50/p95/p99 of the good ones,
the statuses of each kind (good ones must all be 200, every bad one a 4xx: no 5xx at all), and the
server's resident memory (all its processes) once a minute, with its growth after the first
minutes:

    python benchmarks/rest.py --soak-minutes 10 --clients 16

With --in-process N it starts no server: it times the model's pyfunc `predict` in this process, in
requests of N sentences in split order, beside its decoder alone (pre-tokenised) on the same
requests and on the whole split sorted by length, as benchmarks/throughput.py's batched row decodes
it. The first gap is the text path (tokenising, limits, detokenising); the second, the requests'
mix of short and long sentences, which one padded batch decodes at the pace of its longest.

Sentences come from the test split's sources (data/prepared/test.parquet), or a few built-in ones
when this checkout has no prepared data. It prints figures and asserts nothing."""
from __future__ import annotations

import itertools
import random
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests
import typer

from memory import process_tree, tree_rss_mib  # benchmarks/memory.py: the script's folder is on sys.path
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
            "p50_ms": 1000 * percentile(latencies, 0.5),
            "p95_ms": 1000 * percentile(latencies, 0.95)}


def peak_rss_mib(server) -> float:
    """The largest peak resident set among the server's processes (the worker holds the model)."""
    peaks = []
    for process in process_tree(server.pid):
        status = Path(f"/proc/{process.pid}/status").read_text()
        peaks += [int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
    return max(peaks)


def soak_mix(max_sentences: int, max_sentence_tokens: int) -> list:
    """(kind, share of requests, body) of the soak's bad requests, past the served model's limits
    (params.yaml's serve section); the rest are good. Each is one the server must refuse with a
    4xx that says why (tests/test_serving.py checks each message)."""
    return [
        ("over-long", 0.1, lambda s: {"json": {"inputs": ["dog " * (2 * max_sentence_tokens)]}}),
        ("over-long", 0.05, lambda s: {"json": {"inputs": [s] * (max_sentences + 1)}}),
        ("malformed", 0.05, lambda s: {"data": b'{"inputs": [', "headers": {"Content-Type": "application/json"}}),
        ("malformed", 0.05, lambda s: {"json": {"inputs": [42]}}),
        ("malformed", 0.05, lambda s: {"json": {"inputs": [None]}}),
        ("malformed", 0.05, lambda s: {"json": {"inputs": [s], "params": {"beam_size": 500}}}),
    ]


def soak_request(session: requests.Session, url: str, sentence: str, rng: random.Random,
                 mix: list) -> tuple[str, int | str, float]:
    """One request of the mix: (kind, HTTP status or the connection error's name, seconds)."""
    kind, body, draw = "good", {"json": {"inputs": [sentence]}}, rng.random()
    for bad_kind, share, make in mix:
        if draw < share:
            kind, body = bad_kind, make(sentence)
            break
        draw -= share
    start = time.perf_counter()
    try:
        status: int | str = session.post(url, timeout=120, **body).status_code
    except requests.RequestException as error:
        status = type(error).__name__
    return kind, status, time.perf_counter() - start


def soak(url: str, server, pool: list[str], clients: int, minutes: float, seed: int) -> None:
    from pipeline.config import load_params

    limits = load_params().serve
    mix = soak_mix(limits.max_sentences, limits.max_sentence_tokens)
    deadline = time.monotonic() + 60 * minutes
    results: list[tuple[str, int | str, float]] = []
    memory: list[tuple[float, float]] = []
    started = time.monotonic()

    def client(index: int) -> None:
        rng = random.Random(seed + index)
        with requests.Session() as session:
            while time.monotonic() < deadline:
                results.append(soak_request(session, url, rng.choice(pool), rng, mix))  # list.append is atomic

    def sample_memory(stop: threading.Event) -> None:
        while not stop.wait(0 if not memory else 60):
            memory.append(((time.monotonic() - started) / 60, tree_rss_mib(server.pid)))

    stop = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(stop,), daemon=True)
    sampler.start()
    with ThreadPoolExecutor(clients) as executor:
        list(executor.map(client, range(clients)))
    wall = time.monotonic() - started
    stop.set()
    sampler.join()
    memory.append((wall / 60, tree_rss_mib(server.pid)))

    good = sorted(seconds for kind, status, seconds in results if kind == "good" and status == 200)
    print(f"{len(results)} requests in {wall / 60:.1f} min from {clients} clients: {len(results) / wall:.1f} requests/s, "
          f"{len(good) / wall:.1f} good ones/s")
    print(f"good requests answered 200: p50 {1000 * percentile(good, 0.5):.0f} ms, "
          f"p95 {1000 * percentile(good, 0.95):.0f} ms, p99 {1000 * percentile(good, 0.99):.0f} ms")
    print("| kind | requests | statuses |\n|---|---:|---|")
    for kind in ("good", "over-long", "malformed"):
        statuses = Counter(status for k, status, _ in results if k == kind)
        print(f"| {kind} | {sum(statuses.values())} | {', '.join(f'{s}: {n}' for s, n in sorted(statuses.items(), key=str))} |")
    server_errors = sum(1 for _, status, _ in results if not isinstance(status, int) or status >= 500)
    wrong = sum(1 for kind, status, _ in results if not answered_as_expected(kind, status))
    print(f"5xx or no answer: {server_errors}; good not 200 or bad not 4xx: {wrong}")
    print("server RSS, all processes (MiB), by minute: " + ", ".join(f"{m:.0f}: {r:.0f}" for m, r in memory))
    settled = [r for m, r in memory if m >= min(2.0, minutes / 2)]
    print(f"growth after minute {min(2.0, minutes / 2):.0f}: {settled[-1] - settled[0]:+.0f} MiB "
          f"(max {max(settled):.0f}, min {min(settled):.0f})")


def answered_as_expected(kind: str, status: int | str) -> bool:
    """A good request gets 200; a bad one a 4xx (not a 5xx, not a 200, not a dropped connection)."""
    if kind == "good":
        return status == 200
    return isinstance(status, int) and 400 <= status < 500


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] if sorted_values else float("nan")


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
    soak_minutes: float = typer.Option(0, min=0, help="one long level of the last --clients (16) for this many minutes, "
                                                      "with over-long and malformed requests mixed in"),
    seed: int = typer.Option(0, help="--soak-minutes: the mix's random seed"),
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
        if soak_minutes:
            soak(url, server, pool, clients[-1], soak_minutes, seed)
            return
        print("| clients | requests | requests/s | p50 ms | p95 ms |\n|---:|---:|---:|---:|---:|")
        for level in clients:
            r = load_level(url, level, pool, requests_per_level)
            print(f"| {r['clients']} | {r['requests']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} |")
        print(f"server peak RSS: {peak_rss_mib(server):.0f} MiB")


if __name__ == "__main__":
    typer.run(main)
