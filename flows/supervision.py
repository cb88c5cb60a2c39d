"""Running a stage's child process under supervision: in a process group of its own, its output
streamed into a logger line by line, and the whole group killed when it runs past its timeout.

The group, not the child, is what is watched and killed: the stage runner starts DVC, which starts
the stage command (`vamos train`) and its children, all in the runner's group."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import deque
from contextlib import contextmanager

KILL_GRACE_SECONDS = 10  # between SIGTERM and SIGKILL to a timed-out stage's process group
TAIL_LINES = 60  # of the output, kept for the error message of a failed stage


def stream(cmd: list[str], cwd: str, timeout_s: float, logger, env: dict | None = None) -> tuple[int, bool, str]:
    """Run `cmd` in a new process group, logging each output line as it comes; kill the group after
    `timeout_s`. Returns (exit code, timed out, the output's last lines)."""
    env = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True, text=True, errors="replace",
                               bufsize=1)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    try:
        with _group_killed_after(timeout_s, process, logger) as timed_out:
            _log_lines(process.stdout, logger, tail)  # ends when every process holding the pipe has exited
            code = process.wait()
    except BaseException:
        if _group_alive(process):  # interrupted here (e.g. the flow run was cancelled)
            _kill_group(process, logger)
        raise
    return code, timed_out.is_set(), "\n".join(tail)


def _log_lines(lines, logger, tail: deque[str]) -> None:
    for line in lines:
        line = line.rstrip()
        if line.strip():
            logger.info(line)
            tail.append(line)


@contextmanager
def _group_killed_after(timeout_s: float, process: subprocess.Popen, logger):
    """Kill `process`'s group if it still runs after `timeout_s`; yields an Event set when it did."""
    timed_out = threading.Event()

    def on_timeout():
        if not _group_alive(process):  # it ended just in time: its own exit code decides
            return
        timed_out.set()
        _kill_group(process, logger)

    timer = threading.Timer(timeout_s, on_timeout)
    timer.daemon = True
    timer.start()
    try:
        yield timed_out
    finally:
        timer.cancel()
        if timed_out.is_set():  # the output ended with the kill: return once the group is gone
            timer.join()


def _group_alive(process: subprocess.Popen) -> bool:
    """Whether any process of the group still runs. Not just its leader: the runner can die first and
    leave `vamos train` holding the output pipe, which would block the stream until training ends."""
    process.poll()  # reap an exited leader, which as a zombie would still count as a member
    return _signal_group(process, 0)


def _signal_group(process: subprocess.Popen, sig: int) -> bool:
    """Send `sig` to the process group; False when no process of it is left."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return False
    return True


def _kill_group(process: subprocess.Popen, logger) -> None:
    """SIGTERM the whole process group (the runner, DVC, the stage command and its children), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_SECONDS), (signal.SIGKILL, 0)):
        if not _signal_group(process, sig):
            return
        logger.warning("sent %s to the process group %d", sig.name, process.pid)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _group_alive(process):
                return
            time.sleep(0.1)
