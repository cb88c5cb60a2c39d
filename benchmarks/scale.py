"""The data stages on large corpora: wall time and peak RSS of each stage at each corpus size.

    python benchmarks/scale.py --pairs 100000 --pairs 1000000          # after `dvc repro ingest`
    python benchmarks/scale.py --pairs 1000000 --stages ingest --stages prepare

Each corpus is made of unique pairs of realistic length by joining `--join` random Bible verse pairs
(from the shards in data/raw/pairs, which `dvc repro ingest` writes; joining verses is also a known
augmentation), written as one TSV in a project of its own under --workdir. Each stage then runs as
`vamos <stage>` in a process of its own, as DVC runs it, with `--workers` Dask worker processes
(parallel.workers) where given. Two peak RSS figures: wait4's, the largest of the stage process and
each of its children alone; and the whole tree's, the stage process and its Dask workers summed,
sampled every 0.2 s. `train` runs one step (`train.max_steps: 1`, no
lexicon): the time to a first update and the loader's memory. `evaluate` and `register` then decode
the capped test split with that untrained model, which never stops before its length limit (an
upper bound on their time), or with the trained model that `--model` names: the Bible's own
`models/seq2seq/model.pt` knows the joined verses' words and stops where a trained model stops.
It prints figures and asserts nothing."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import typer
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from memory import TreeRss  # noqa: E402

from pipeline.device import cpu_info  # noqa: E402
from pipeline.storage import MODEL_FILE, RAW_PAIRS, raw_shards  # noqa: E402
from pipeline.tracking import git_commit  # noqa: E402

STAGES = ["ingest", "prepare", "embed", "train", "evaluate", "register"]


def write_corpus(verses: pd.DataFrame, pairs: int, join: int, path: Path, seed: int) -> None:
    """`pairs` lines of `join` random verse pairs each, streamed to `path` (bounded memory)."""
    rng = random.Random(seed)
    src, tgt, n = verses["src"].tolist(), verses["tgt"].tolist(), len(verses)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for _ in range(pairs):
            picks = [rng.randrange(n) for _ in range(join)]
            out.write(" ".join(src[i] for i in picks) + "\t" + " ".join(tgt[i] for i in picks) + "\n")


def project(root: Path, corpus: Path, join: int, workers: int | None) -> None:
    """params.yaml: the repository's, reading only `corpus`; sides may be `join` verses long."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if workers is not None:
        params["parallel"]["workers"] = workers
    params["ingest"]["sources"] = [{"kind": "tsv", "name": "scale", "path": str(corpus)}]
    params["prepare"]["split"].pop("hold_out", None)  # it names the default corpus's sources
    params["ingest"]["max_words"] = params["ingest"]["max_words"] * join
    params["train"].update(max_steps=1, lexicon=False, max_minutes=None)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage(stage: str, root: Path) -> tuple[float, float, float, int]:
    """(seconds, wait4's peak RSS in MB, the tree's summed peak RSS in MB, exit code) of
    `vamos <stage>` in `root`."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    with open(root / f"{stage}.log", "w") as log:
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", stage], cwd=root, env=env,
                                   stdout=subprocess.DEVNULL, stderr=log)
        tree = TreeRss(process.pid)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak, unlike RUSAGE_CHILDREN's
        process.returncode = os.waitstatus_to_exitcode(status)
    return time.monotonic() - started, usage.ru_maxrss / 1024, tree.stop(), process.returncode


def main(pairs: list[int] = typer.Option([100_000], help="corpus sizes, in pairs (repeat the option)"),
         stages: list[str] = typer.Option(STAGES, help="stages to run, in order (repeat the option)"),
         join: int = typer.Option(2, min=1, help="verse pairs joined into one corpus pair"),
         workers: int = typer.Option(None, min=0, help="parallel.workers: Dask worker processes (0: one per core)"),
         workdir: Path = typer.Option(Path("/tmp/vamos-scale"), help="where the corpora and projects go"),
         model: Path = typer.Option(None, exists=True, dir_okay=False,
                                    help="a trained model.pt for evaluate and register (after train's one step)"),
         seed: int = typer.Option(1234)) -> None:
    shards = raw_shards(REPO / RAW_PAIRS)
    if not shards:
        raise typer.BadParameter(f"{REPO / RAW_PAIRS} holds no shards: run `dvc repro ingest` first")
    verses = pd.concat([pd.read_parquet(shard, columns=["src", "tgt"]) for shard in shards], ignore_index=True)
    cpu, isa = cpu_info()
    print(f"host: {cpu} ({', '.join(isa)}), {os.cpu_count()} cores; commit {git_commit()[:10]}")
    print(f"command: {' '.join(sys.argv)}")
    print(f"parallel.workers: {'params.yaml' if workers is None else workers}")
    print(f"evaluate and register decode: {model or 'the one-step model (an upper bound)'}")
    print("| pairs | stage | seconds | peak RSS, wait4 (MB) | peak RSS, process tree (MB) | exit |\n"
          "|---|---|---|---|---|---|")
    for size in pairs:
        root = workdir / f"{size}"
        shutil.rmtree(root, ignore_errors=True)
        corpus = root / "corpus.tsv"
        write_corpus(verses, size, join, corpus, seed)
        project(root, corpus, join, workers)
        for stage in stages:
            seconds, rss, tree_rss, code = run_stage(stage, root)
            print(f"| {size:,} | {stage} | {seconds:,.1f} | {rss:,.0f} | {tree_rss:,.0f} | {code} |", flush=True)
            if code != 0:
                print(f"  {stage} failed: see {root / f'{stage}.log'}")
                break
            if stage == "train" and model:
                shutil.copyfile(model, root / MODEL_FILE)


if __name__ == "__main__":
    typer.run(main)
