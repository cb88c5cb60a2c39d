"""Resident memory of a process and everything it started, for the benchmarks that run stages or
servers as child processes (scale.py, rest.py): psutil only, so any of them can import it."""
from __future__ import annotations

import threading

import psutil


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (a server's workers, a stage's pool)."""
    process = psutil.Process(pid)
    return [process, *process.children(recursive=True)]


def tree_rss_mib(pid: int) -> float:
    """The summed resident memory of the tree now, in MiB; a process that ends meanwhile counts 0."""
    total = 0
    for process in process_tree(pid):
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


class TreeRss:
    """The peak of tree_rss_mib, sampled every `every` s in a thread until `stop`."""

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every, self.peak = pid, every, 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, tree_rss_mib(self.pid))
            except psutil.NoSuchProcess:  # the process itself has ended
                return
            self.done.wait(self.every)

    def stop(self) -> float:
        """The peak in MiB."""
        self.done.set()
        self.thread.join()
        return self.peak
