"""dvc.yaml lists all the code each stage runs, or DVC reports stale outputs as up to date.

A stage runs `vamos <stage>`: cli.py's module-level imports, `_run_stage`'s imports, stages.py's
module-level imports and the stage function's own imports. From those, modulefinder follows every
import statically and transitively, including the lazy ones inside functions (an over-approximation,
which is the safe side for dependencies)."""
from __future__ import annotations

import ast
import inspect
from modulefinder import ModuleFinder
from pathlib import Path

import pytest
import yaml

import pipeline.cli
from pipeline.stages import STAGES

REPO = Path(__file__).resolve().parent.parent
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))


def executed_imports(node: ast.AST) -> list[ast.stmt]:
    """The import statements that run when `node` runs: not those inside nested functions."""
    found = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            if getattr(child, "module", None) != "__future__":
                found.append(child)
        elif not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            found.extend(executed_imports(child))
    return found


def function_imports(function) -> list[ast.stmt]:
    definition = ast.parse(inspect.getsource(function).strip() + "\n").body[0]
    return [n for stmt in definition.body for n in [stmt] + list(ast.walk(stmt))
            if isinstance(n, (ast.Import, ast.ImportFrom))]


def entry_imports(stage: str) -> list[ast.stmt]:
    function = STAGES[stage]
    cli_module, stage_module = inspect.getmodule(pipeline.cli), inspect.getmodule(function)
    return (executed_imports(ast.parse(inspect.getsource(cli_module)))
            + function_imports(pipeline.cli._run_stage)
            + executed_imports(ast.parse(inspect.getsource(stage_module)))
            + function_imports(function))


def files_run_by(stage: str, tmp_path: Path) -> set[str]:
    """Repo-relative paths of every `pipeline` source file that `vamos <stage>` may execute."""
    script = tmp_path / f"{stage}_entry.py"
    script.write_text("\n".join(ast.unparse(n) for n in entry_imports(stage)) + "\n")
    # Only the repo on its path: third-party packages are not ours to list. cli.py and stages.py
    # are excluded: the imports of theirs that this stage runs are already in the script.
    entries = [inspect.getmodule(pipeline.cli).__name__, inspect.getmodule(STAGES[stage]).__name__]
    finder = ModuleFinder(path=[str(REPO)], excludes=entries)
    finder.run_script(str(script))
    files = {Path(m.__file__).resolve() for name, m in finder.modules.items()
             if name.split(".")[0] == "pipeline" and m.__file__}
    files |= {Path(inspect.getfile(pipeline.cli)).resolve(), Path(inspect.getfile(STAGES[stage])).resolve()}
    return {p.relative_to(REPO).as_posix() for p in files}


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def test_every_stage_of_the_pipeline_is_in_dvc_yaml():
    assert list(DVC_YAML["stages"]) == list(STAGES)


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_lists_all_the_code_it_runs(stage, tmp_path):
    deps = DVC_YAML["stages"][stage].get("deps", [])
    missing = sorted(p for p in files_run_by(stage, tmp_path) if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage!r} runs these files but does not list them in deps: {missing}"


@pytest.mark.parametrize("stage", [s for s in STAGES if s != "register"])
def test_stage_lists_no_code_it_does_not_run(stage, tmp_path):
    """An extra module in a stage's deps reruns the stage for edits that cannot change its outputs
    (evaluate used to rerun for every edit of the training code)."""
    code = [d for d in DVC_YAML["stages"][stage].get("deps", []) if d.startswith("pipeline")]
    run = files_run_by(stage, tmp_path)
    extra = sorted(d for d in code if not any(covered(p, [d]) for p in run))
    assert not extra, f"dvc.yaml stage {stage!r} lists code it does not run: {extra}"


def test_evaluation_does_not_depend_on_the_training_code(tmp_path):
    training = {"pipeline/train.py", "pipeline/loss.py", "pipeline/schedule.py", "pipeline/checkpoint.py"}
    assert not training & files_run_by("evaluate", tmp_path)
    assert not training & set(DVC_YAML["stages"]["evaluate"]["deps"])


def test_the_check_sees_lazy_imports(tmp_path):
    """The derivation itself: train's checkpoint selection decodes (a lazy chain through model/)."""
    files = files_run_by("train", tmp_path)
    assert {"pipeline/decode.py", "pipeline/embeddings.py", "pipeline/model/seq2seq.py", "pipeline/cli.py",
            "pipeline/stages.py", "pipeline/tracking.py"} <= files
    assert "pipeline/registry.py" not in files


def test_register_depends_on_the_whole_package():
    """The registered model bundles the whole `pipeline` package (MLflow code_paths)."""
    assert "pipeline" in DVC_YAML["stages"]["register"]["deps"]


def test_register_is_never_restored_from_the_run_cache():
    """DVC's run-cache skips stages with `always_changed` (dvc/stage/cache.py: _can_hash); otherwise
    it could restore reports/registry.json without registering anything in MLflow."""
    assert DVC_YAML["stages"]["register"].get("always_changed") is True
