"""The run summary (flows/summary.py): the Prefect artifact's Markdown, made from a run's reports
without a Prefect server. The reports are those of the committed run of the default corpus, trimmed."""
from flows.summary import Experiment, MlflowRun, run_summary

STATUSES = {"ingest": "skipped", "prepare": "skipped", "embed": "restored", "train": "ran", "evaluate": "ran",
            "register": "ran"}
REPORTS = {
    "metrics": {"test": {"bleu": 36.35, "chrf": 57.0, "ter": 51.91, "greedy": {"bleu": 35.14, "chrf": 55.74},
                         "beam_size": 5, "sentences": 281}},
    "registry": {"model": "vamos-en-es", "version": 1, "alias": "champion", "metric": "bleu", "score": 36.35,
                 "run_id": "d03662e6ba7648d99ed92ca66fcd551f"},
    "train": {"best_valid_bleu": 33.374813604746585, "epochs": 11.0, "stopped_by": "epochs"},
    "train_speed": {"train_minutes": 84.99, "tokens_per_sec": 1846.6},
}
RUN_ID = REPORTS["registry"]["run_id"]
# `dvc metrics diff HEAD --json`: a nested metric (a dict) has no single value and is left out.
DIFF = {"reports/metrics.json": {"test.bleu": {"old": 35.1, "new": 36.35, "diff": 1.25},
                                 "test.greedy": {"old": {"bleu": 34.0}, "new": {"bleu": 35.14}}},
        "reports/train.json": {"epochs": {"old": 10.0, "new": 11.0, "diff": 1.0}}}
SQLITE = "sqlite:////home/me/vamos/mlflow.db"


def rows(markdown: str) -> dict[str, str]:
    """The metric table's rows, name -> value."""
    table = markdown.split("| metric | value |\n|---|---|\n", 1)[1].split("\n\n", 1)[0]
    return dict(line[2:-2].split(" | ", 1) for line in table.splitlines())


def test_a_workspace_run_shows_stages_metrics_links_and_the_diff():
    markdown = run_summary(STATUSES, REPORTS, DIFF, MlflowRun(SQLITE, RUN_ID, "3"), remote="/srv/dvc-remote")
    assert markdown.startswith("# vamos run\n\nStages: ingest: skipped, prepare: skipped, embed: restored, "
                               "train: ran, evaluate: ran, register: ran\n")
    shown = rows(markdown)
    assert list(shown)[:8] == ["test BLEU (beam)", "test chrF (beam)", "test TER (beam)", "test BLEU (greedy)",
                               "best valid BLEU", "training minutes", "stopped by", "registered"]
    assert (shown["test BLEU (beam)"], shown["test TER (beam)"], shown["test BLEU (greedy)"]) == ("36.35", "51.91",
                                                                                                  "35.14")
    assert shown["best valid BLEU"] == "33.374813604746585" and shown["training minutes"] == "84.99"
    assert shown["registered"] == "vamos-en-es v1 → champion"
    # A SQLite store has no web address: the links go to `mlflow ui`, and say how to start it.
    ui = f" (after `mlflow ui --backend-store-uri {SQLITE}`)"
    assert shown["MLflow store"] == f"`{SQLITE}`"
    assert shown["MLflow run"] == f"[{RUN_ID}](http://127.0.0.1:5000/#/experiments/3/runs/{RUN_ID}){ui}"
    assert shown["model version"] == (f"[vamos-en-es v1](http://127.0.0.1:5000/#/models/vamos-en-es/versions/1){ui}, "
                                      "alias champion")
    assert list(shown)[-1] == "pushed to" and shown["pushed to"] == "/srv/dvc-remote"
    assert "DVC experiment" not in shown
    diff = markdown.split("## Against the last commit\n\n", 1)[1]
    assert diff == ("| file | metric | HEAD | this run | change |\n|---|---|---|---|---|\n"
                    "| reports/metrics.json | test.bleu | 35.1 | 36.35 | 1.25 |\n"
                    "| reports/train.json | epochs | 10.0 | 11.0 | 1.0 |\n")


def test_an_experiment_comes_first_and_is_not_pushed():
    ref = "refs/exps/ab/cdef/vamos-20250101-030000-calm-fox"
    markdown = run_summary(STATUSES, REPORTS, DIFF, MlflowRun("http://mlflow.example:5000/", RUN_ID, "3"),
                           experiment=Experiment("vamos-20250101-030000-calm-fox", ref))
    shown = rows(markdown)
    assert list(shown)[0] == "DVC experiment"
    assert shown["DVC experiment"] == (f"`vamos-20250101-030000-calm-fox` ({ref}): "
                                       "`dvc exp apply vamos-20250101-030000-calm-fox`")
    # A tracking server's own address is linked, with no hint to start `mlflow ui`.
    assert shown["MLflow run"] == f"[{RUN_ID}](http://mlflow.example:5000/#/experiments/3/runs/{RUN_ID})"
    assert shown["pushed to"] == "not pushed (an experiment)"
    lost = rows(run_summary(STATUSES, REPORTS, DIFF, MlflowRun(SQLITE), experiment=Experiment("x", None)))
    assert lost["DVC experiment"] == "`x` (ref not found): `dvc exp apply x`"


def test_a_run_without_reports_or_a_model_says_so():
    empty = {name: {} for name in REPORTS}
    markdown = run_summary({"summary": "ran"}, empty, {}, MlflowRun(SQLITE))
    shown = rows(markdown)
    assert shown["test BLEU (beam)"] == "" and shown["registered"] == " v → "
    assert "MLflow run" not in shown and "model version" not in shown
    assert shown["pushed to"] == "no DVC remote"
    assert markdown.endswith("No metric changed since the last commit (`dvc metrics diff HEAD`).\n")


def test_a_failed_metrics_diff_is_shown_with_dvcs_words():
    markdown = run_summary(STATUSES, REPORTS, "ERROR: unexpected error - bad revision 'HEAD'", MlflowRun(SQLITE))
    assert markdown.endswith("(`dvc metrics diff HEAD` failed: ERROR: unexpected error - bad revision 'HEAD')\n")
    registered_without_alias = {**REPORTS, "registry": {**REPORTS["registry"], "alias": None}}
    assert rows(run_summary(STATUSES, registered_without_alias, {}, MlflowRun(SQLITE, RUN_ID)))[
        "model version"].endswith(", alias none")


def test_each_source_of_a_mixed_test_split_has_a_row():
    """The committed run's test split mixes Bible verses and held-out software messages."""
    by_source = {"bible": {"bleu": 35.36, "chrf": 56.39, "ter": 52.75, "sentences": 281},
                 "software-test": {"bleu": 21.6, "chrf": 49.14, "ter": 67.77, "sentences": 1573}}
    reports = {**REPORTS, "metrics": {"test": {**REPORTS["metrics"]["test"], "by_source": by_source}}}
    shown = rows(run_summary(STATUSES, reports, DIFF, MlflowRun(SQLITE, RUN_ID, "3")))
    assert shown["test BLEU / chrF, bible"] == "35.36 / 56.39 (281 sentences)"
    assert shown["test BLEU / chrF, software-test"] == "21.6 / 49.14 (1573 sentences)"
    assert list(shown).index("test BLEU / chrF, bible") == list(shown).index("test BLEU (greedy)") + 1
