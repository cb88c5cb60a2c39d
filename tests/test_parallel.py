"""pipeline/parallel.py: the pools that run ingest's and prepare's sharded work."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from pipeline.config import ParallelParams
from pipeline.parallel import InlinePool, shard_pool
from pipeline.text import Vocab

REPO = Path(__file__).resolve().parent.parent


def test_one_worker_or_one_task_runs_inline():
    with shard_pool(ParallelParams(workers=1)) as pool:
        assert isinstance(pool, InlinePool)
        assert list(pool.map(pow, [2, 3], 2)) == [4, 9]
    with shard_pool(ParallelParams(workers=2), tasks=1) as pool:
        assert isinstance(pool, InlinePool)


def test_two_local_clusters_one_after_the_other_in_a_fresh_process():
    """As ingest then prepare run in one process (a test, a notebook): the first pool's config
    override must not drop distributed's defaults when it ends (the second cluster then failed
    with KeyError: 'comm'). A fresh interpreter, since an earlier import of distributed hides it."""
    script = textwrap.dedent("""
        from pipeline.config import ParallelParams
        from pipeline.parallel import DaskPool, shard_pool
        for _ in range(2):
            with shard_pool(ParallelParams(workers=2)) as pool:
                assert isinstance(pool, DaskPool), pool
                print(list(pool.map(pow, range(6), 2)))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["[0, 1, 4, 9, 16, 25]"] * 2



def vocab_size_plus(item: int, vocab: Vocab) -> int:
    return item + len(vocab)


def test_an_argument_every_task_shares_is_sent_once():
    """prepare's vocabulary goes with every encoding task. Sent with each, copies of it stayed in the
    parent (2 to 5 MB a task, 0.8 GB by the end of prepare at 1M pairs; here about 170 MB for 40
    tasks). Sent once, the parent hardly grows, and the results are right and in order."""
    import psutil

    vocab = Vocab(f"word{i}" for i in range(200_000))
    with shard_pool(ParallelParams(workers=2)) as pool:
        before = psutil.Process().memory_info().rss
        results = list(pool.map(vocab_size_plus, range(40), vocab))
        grown = psutil.Process().memory_info().rss - before
    assert results == [len(vocab) + i for i in range(40)]
    assert grown < 40 * 2**20, f"the parent grew {grown / 2**20:.0f} MB over 40 tasks"
