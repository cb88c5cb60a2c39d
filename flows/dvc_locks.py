"""DVC's locks after a stage's processes were killed: what they left behind, reported, never edited."""
from __future__ import annotations

import json
from pathlib import Path


def report_stale_dvc_locks(project: str, logger) -> list[str]:
    """Report DVC's per-path lock entries (.dvc/tmp/rwlock) that name dead processes. DVC drops those
    itself on its next run (under its own guard lock: the file is never edited here, where a concurrent
    dvc command could lose its entry). The repository lock (.dvc/tmp/lock) is an fcntl lock, which the
    kernel released with its process: check that it can be taken."""
    stale = _dead_holders(Path(project) / ".dvc" / "tmp" / "rwlock")
    for entry in stale:
        logger.warning("stale DVC lock (DVC drops it on its next run): %s", entry)
    _check_repository_lock(Path(project) / ".dvc" / "tmp" / "lock", logger)
    return stale


def _dead_holders(rwlock: Path) -> list[str]:
    import psutil

    try:
        lock = json.loads(rwlock.read_text())
    except (OSError, ValueError):
        lock = {}
    stale = []
    for mode in ("read", "write"):
        for path, infos in (lock.get(mode, {}) if isinstance(lock, dict) else {}).items():
            for entry in infos if isinstance(infos, list) else [infos]:
                if not psutil.pid_exists(int(entry.get("pid", 0))):
                    stale.append(f"{mode} lock on {path} held by killed PID {entry.get('pid')} ({entry.get('cmd')})")
    return stale


def _check_repository_lock(repo_lock: Path, logger) -> None:
    if not repo_lock.exists():
        return
    import zc.lockfile

    try:
        zc.lockfile.LockFile(str(repo_lock)).close()
    except zc.lockfile.LockError:
        logger.warning("DVC's repository lock %s is held by a live process (another dvc command?)", repo_lock)
    else:
        logger.info("DVC's repository lock %s is free", repo_lock)
