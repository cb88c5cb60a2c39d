"""Where the sharded work of ingest and prepare runs: in this process, on a local Dask cluster of
worker processes, or on a Dask cluster that the user names (`parallel.scheduler` in params.yaml, or
the VAMOS_DASK_SCHEDULER environment variable). Results come back in submission order whatever
runs them, so every backend writes the same bytes; only the speed differs.

A task receives what it needs (a chunk of rows, or a shard's path) and returns a small result; at
most a few tasks per worker are in flight, so memory stays bounded however many shards there are.
Paths given to tasks are absolute: on a real cluster they must be on a filesystem that every
worker mounts at the same place (docs/scale-out.md)."""
from __future__ import annotations

import logging
import os
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

from pipeline.config import ParallelParams

log = logging.getLogger(__name__)

SCHEDULER_ENV = "VAMOS_DASK_SCHEDULER"
TASKS_IN_FLIGHT_PER_WORKER = 2


class InlinePool:
    """Runs each task here, one at a time: for one worker, or for work that is a single shard."""

    workers = 1

    def map(self, fn: Callable, items: Iterable, *args: Any) -> Iterator:
        for item in items:
            yield fn(item, *args)


class DaskPool:
    """Runs tasks on a dask.distributed cluster, `in_flight` at a time, yielding results in order."""

    def __init__(self, client, workers: int):
        self.client, self.workers = client, max(workers, 1)

    def map(self, fn: Callable, items: Iterable, *args: Any) -> Iterator:
        pending: deque = deque()
        # What every task shares (a vocabulary, a sentencepiece model) goes to every worker once.
        # Passed with each task, it stayed in this process (where a local scheduler runs): 2 to 5
        # MB a task, 0.8 GB by the end of prepare at 1M pairs. Broadcast, it survives a worker's loss.
        args = tuple(self.client.scatter([arg], broadcast=True, hash=False)[0] for arg in args)
        in_flight = self.workers * TASKS_IN_FLIGHT_PER_WORKER
        for item in items:
            # pure=False: two equal chunks are still two tasks (Dask would otherwise merge them).
            pending.append(self.client.submit(fn, item, *args, pure=False))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def scheduler_address(cfg: ParallelParams) -> str | None:
    return os.environ.get(SCHEDULER_ENV) or cfg.scheduler


def local_workers(cfg: ParallelParams) -> int:
    """`parallel.workers`, or one per core this process may run on (taskset, Slurm and containers
    restrict that below the host's count)."""
    return cfg.workers or len(os.sched_getaffinity(0)) or 1


@contextmanager
def shard_pool(cfg: ParallelParams, tasks: int | None = None) -> Iterator[InlinePool | DaskPool]:
    """A pool for `tasks` tasks (None: unknown, maybe many). A named scheduler is always used; a
    local cluster only where there are several workers and more than one task to share."""
    import dask
    import distributed  # noqa: F401  its config defaults first: leaving dask.config.set would drop them

    # A chunk of rows travels in its task (about 30 MB for 25,000 long pairs), where the scheduler
    # can run it again if a worker dies; Dask would warn of a "large graph" for every one.
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": "1GiB"}):
        yield from _pool(cfg, tasks)


def _pool(cfg: ParallelParams, tasks: int | None) -> Iterator[InlinePool | DaskPool]:
    address = scheduler_address(cfg)
    if address:
        from distributed import Client

        with Client(address, timeout="30s") as client:
            workers = len(client.scheduler_info(n_workers=-1)["workers"])
            log.info("sharded work on the Dask cluster at %s (%d workers)", address, workers)
            yield DaskPool(client, workers)
        return
    workers = local_workers(cfg)
    if workers <= 1 or (tasks is not None and tasks <= 1):
        yield InlinePool()
        return
    from distributed import Client, LocalCluster

    # Processes, one thread each: tokenising and cleaning are pure Python, held by the GIL.
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.WARNING) as cluster, Client(cluster) as client:
        log.info("sharded work on a local Dask cluster of %d processes", workers)
        yield DaskPool(client, workers)
