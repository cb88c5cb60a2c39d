"""Reproduce one DVC stage, or the whole pipeline as a DVC experiment, and say what happened in DVC's
own terms rather than its wording. The Prefect flow runs this in a child process (its process group
is killed on a timeout):

    python -m flows.dvc_stage repro STAGE RESULT.json        # what `dvc repro --single-item STAGE` does
    python -m flows.dvc_stage exp NAME RESULT.json k=v ...   # `dvc exp run --temp -n NAME -S k=v ...`

It runs DVC's Python API (`Repo.status`, `Repo.reproduce`, `Repo.experiments.run`) in this process,
with two hooks in `dvc.stage.run` that see what DVC decided:

- `cmd_run` is called only when DVC runs a stage's command; a stage that DVC reproduced without it
  was restored from the run-cache (its outputs checked out, its command not run).
- `StageCmdFailedError` is replaced by a subclass that keeps the command's exit code, which
  `dvc repro` folds into its own 255. So the codes of `vamos <stage>` (pipeline/cli.py: 2 bad input,
  75 lock or busy database, 1 crash) reach the flow unchanged; a command killed by signal N gives 128 + N.

RESULT.json gets {"statuses": {stage: "skipped" | "ran" | "restored"}, "exit_code": N, "error": str}.
The process exits with that code: 0, the stage command's code, 75 when DVC's own repository lock is
held by another process, 1 on any other DVC error (its traceback printed)."""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

EXIT_CRASH, EXIT_TEMPFAIL = 1, 75  # as pipeline/cli.py (not imported: this runs in DVC's interpreter only)


def _hook_dvc(statuses: dict[str, str]):
    import dvc.stage as dvc_stage
    import dvc.stage.run as stage_run

    cmd_run, stage_run_method = stage_run.cmd_run, dvc_stage.Stage.run

    def run(stage, *args, **kwargs):  # DVC found the stage changed: it reproduces it (run-cache or command)
        statuses[stage.addressing] = "restored"
        return stage_run_method(stage, *args, **kwargs)

    def run_command(stage, *args, **kwargs):
        statuses[stage.addressing] = "ran"
        return cmd_run(stage, *args, **kwargs)

    class CommandFailed(stage_run.StageCmdFailedError):
        def __init__(self, cmd, status=None):
            super().__init__(cmd, status)
            self.status = status

    dvc_stage.Stage.run = run
    stage_run.cmd_run = run_command
    stage_run.StageCmdFailedError = CommandFailed
    return CommandFailed


def _caused_by(error: BaseException | None, kind: type) -> BaseException | None:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _die_with_the_flow() -> None:
    """If the flow's process dies, even by SIGKILL, take this stage's process group (this process
    leads it: the flow starts it in a session of its own) down too, instead of leaving a stage
    running that holds DVC's lock against the next run."""
    import ctypes
    import os
    import signal

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.killpg(0, signal.SIGTERM)  # the stage command and its children, then this process

    signal.signal(signal.SIGTERM, stop)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):  # not Linux: the flow's own timeout still kills the group
        return
    if os.getppid() == 1:  # the flow died before prctl took effect
        stop(signal.SIGTERM, None)


def main(argv: list[str]) -> int:
    mode, name, result_file, *overrides = argv
    _die_with_the_flow()
    import dvc.logger  # noqa: F401 - importing DVC sets up its console logging, as the `dvc` command has it
    from dvc.exceptions import DvcException
    from dvc.lock import LockError
    from dvc.repo import Repo

    statuses: dict[str, str] = {}
    command_failed = _hook_dvc(statuses)
    result: dict = {"statuses": statuses, "exit_code": 0, "error": ""}
    try:
        with Repo(".") as repo:
            if mode == "repro":
                if not repo.status(targets=[name]):  # DVC's own state: nothing changed since dvc.lock
                    statuses[name] = "skipped"
                else:
                    repo.reproduce(name, single_item=True)
                    statuses.setdefault(name, "skipped")
            elif mode == "exp":
                for stage in repo.index.stages:
                    statuses.setdefault(stage.addressing, "skipped")
                repo.experiments.run(params=overrides, name=name, tmp_dir=True)  # as `-S key=value ...`
            else:
                raise SystemExit(f"unknown mode {mode!r}")
    except Exception as e:  # noqa: BLE001 - mapped to an exit code by cause
        failed = _caused_by(e, command_failed)
        if failed is not None and isinstance(failed.status, int):
            code = failed.status if failed.status >= 0 else 128 - failed.status
            result.update(exit_code=code, error=str(failed))
        elif _caused_by(e, LockError) is not None:
            print(f"DVC's repository lock is held by another process: {e}", file=sys.stderr, flush=True)
            result.update(exit_code=EXIT_TEMPFAIL, error=str(_caused_by(e, LockError)))
        else:
            if not isinstance(e, DvcException):
                traceback.print_exc()
            print(f"dvc failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            result.update(exit_code=EXIT_CRASH, error=f"{type(e).__name__}: {e}")
    Path(result_file).write_text(json.dumps(result))
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
