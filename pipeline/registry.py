"""Register the trained model in MLflow and decide its alias by a fair comparison.

The new model and the current champion (whichever version holds the alias now, also when a
person moved it by hand) are decoded alike, with today's decoder and the evaluate settings, on
today's test split. `champion` moves only for a gain of at least `register.min_gain` that a paired
bootstrap test finds significant at `register.max_p`; otherwise the new version is `challenger`.
No stored score is ever compared: a stored score may come from another test set or decoder.

Registering is idempotent: a version is keyed by the md5 of its model file and the settings the
logged model reads (search, limits), so a retry reuses it, and a repeat with the same champion,
test set and settings returns the recorded decision."""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import metrics, storage
from pipeline.storage import file_md5
from pipeline.config import Params
from pipeline.tracking import dvc_hashes, experiment_name, git_commit, mlflow_setup, split_dataset, workspace_root

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
LOCK_ARTIFACT = "restore/dvc.lock"  # the run's dvc.lock: which data, embeddings and model to pull
# Past it, filelock's Timeout: `vamos register` exits 75 (EX_TEMPFAIL) and the flow retries it later.
REGISTER_WAIT_SECONDS = 30 * 60


def test_set_sha256(frame: pd.DataFrame) -> str:
    """What the comparison was made on: the ids and texts of the test split, in order."""
    rows = frame[["id", "src", "tgt"]].astype(str).agg("\t".join, axis=1)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def paired_bootstrap(metric_name: str, new: list[str], old: list[str], references: list[str], samples: int,
                     seed: int, lang: str) -> dict:
    """Both systems' scores, the delta (new - old) with its 95% interval, and the p-value of
    sacrebleu's paired bootstrap test (Koehn 2004), from one set of resamples of the sentences.

    The p-value counts resampled differences (centred on zero: the null hypothesis) at least as
    large as the observed one; sacrebleu counts strictly larger ones, which gives two identical
    systems p = 1/(samples + 1), "significant"."""
    metric = metrics.metric(metric_name, lang)
    stats = [np.array(metric._extract_corpus_statistics(h, [references]), dtype=np.float64) for h in (new, old)]
    new_score, old_score = (metric._compute_score_from_stats(s.sum(0)).score for s in stats)
    resamples = np.random.default_rng(seed).choice(len(references), size=(samples, len(references)))
    new_samples, old_samples = (np.array([metric._compute_score_from_stats(s[i].sum(0)).score for i in resamples])
                                for s in stats)
    deltas = new_samples - old_samples
    spread = np.abs(deltas)
    p_value = (np.sum(spread - spread.mean() >= abs(new_score - old_score)) + 1) / (samples + 1)
    low, high = np.percentile(deltas, [2.5, 97.5])
    return {"new": round(new_score, 2), "champion": round(old_score, 2), "delta": round(new_score - old_score, 2),
            "delta_95ci": [round(float(low), 2), round(float(high), 2)], "p_value": round(float(p_value), 4)}


@dataclass
class Decision:
    alias: str | None
    reason: str


def decide(params: Params, score: float, comparison: dict | None) -> Decision:
    """The alias for the new model, from its score and its comparison with the champion."""
    cfg = params.registry
    sign = 1.0 if cfg.directions[cfg.metric] == "higher" else -1.0
    if comparison is None:
        if sign * (score - cfg.min_score) >= 0:
            return Decision(CHAMPION, f"first model; {cfg.metric} {score:.2f} reaches min_score {cfg.min_score}")
        return Decision(None, f"first model; {cfg.metric} {score:.2f} misses min_score {cfg.min_score}: no alias")
    gain = sign * comparison["delta"]
    if gain < cfg.min_gain:
        return Decision(CHALLENGER, f"gain {gain:+.2f} {cfg.metric} is under min_gain {cfg.min_gain}")
    if comparison["p_value"] > cfg.max_p:
        return Decision(CHALLENGER, f"gain {gain:+.2f} is not significant (p {comparison['p_value']} > {cfg.max_p})")
    return Decision(CHAMPION, f"gain {gain:+.2f} {cfg.metric} >= {cfg.min_gain}, p {comparison['p_value']} <= {cfg.max_p}")


def model_checkpoint(model_uri: str, dst: Path) -> Path:
    """The checkpoint file inside a logged translator model (its pyfunc artifact)."""
    import mlflow
    from mlflow.models import Model

    from pipeline.serving import CHECKPOINT

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    artifacts = Model.load(str(local)).flavors["python_function"]["artifacts"]
    return local / artifacts[CHECKPOINT]["path"]


def test_translations(params: Params, checkpoint: Path, test: pd.DataFrame) -> list[str]:
    from pipeline.evaluate import detokenize_all, translate_split
    from pipeline.model import load_translator
    from pipeline.device import pick_device

    translator = load_translator(checkpoint, pick_device(params.train.device))
    return detokenize_all(translator, translate_split(translator, test, params.evaluate))


def model_key(md5: str, params: Params) -> str:
    """A version's identity: its weights and what the logged model reads at load time (search
    settings, limits). A retry finds the version it made; new serving settings make a new one."""
    from pipeline.serving import model_config

    return hashlib.sha1(json.dumps([md5, model_config(params)], sort_keys=True).encode()).hexdigest()[:16]


def registered_version(client, name: str, key: str):
    versions = [v for v in client.search_model_versions(f"name='{name}'") if v.tags.get("model_key") == key]
    return min(versions, key=lambda v: int(v.version), default=None)


def alias_holder(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such model or alias yet
        return None


def decode_settings(params: Params) -> str:
    """The evaluate settings that change a translation (batching and reports do not)."""
    return json.dumps(params.evaluate.model_dump(exclude={"batch_size", "heatmaps", "samples"}), sort_keys=True)


def decision_key(params: Params, champion_version: str | None, test_sha: str) -> str:
    """Everything a decision depends on besides the two models: repeat it and nothing changes."""
    rules = params.registry.model_dump(include={"metric", "directions", "min_gain", "max_p", "min_score",
                                                "bootstrap_samples"})
    return hashlib.sha1(json.dumps([champion_version, test_sha, decode_settings(params), rules, experiment_name()],
                                   sort_keys=True).encode()).hexdigest()[:16]


def dvc_remote_url() -> str:
    try:
        from dvc.config import Config

        config = Config(dvc_dir=".dvc")
        return config["remote"].get(config["core"].get("remote", ""), {}).get("url", "")
    except Exception:  # no DVC project here (tests, a bare checkout): nothing to name
        return ""


def git_dirty() -> bool:
    """Whether tracked code or params differ from the commit: then the commit alone does not restore
    them. (dvc.lock and reports/ are what the run itself rewrites; the run logs its dvc.lock.)"""
    import subprocess

    result = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock",
                             ":(exclude)reports"], capture_output=True, text=True)
    return result.returncode == 0 and bool(result.stdout.strip())


def version_tags(params: Params, md5: str, record: dict, model_file: Path) -> dict[str, str]:
    """What restores this version anywhere: the commit, dvc.lock's md5s and the remote."""
    hashes = dvc_hashes()
    return {
        "model_md5": md5, "git_commit": git_commit(), "git_dirty": str(git_dirty()).lower(),
        "dvc.remote_url": dvc_remote_url(),
        "dvc.prepared_md5": hashes.get(str(storage.PREPARED), "unknown"),
        "dvc.embeddings_md5": hashes.get(str(storage.EMBEDDINGS), "unknown"),
        "dvc.seq2seq_md5": hashes.get(str(model_file.parent), "unknown"),
        "test_sha256": record["test_sha256"], "test_sentences": str(record["test_sentences"]),
        f"test_{params.registry.metric}": str(record["score"]),
    }


def describe(record: dict) -> str:
    """The version's description in the registry: the comparison as a table a person reads."""
    c = record.get("comparison")
    rows = [("decision", f"{record['alias'] or 'no alias'}: {record['reason']}"),
            (f"test {record['metric']}", record["score"]),
            ("test set", f"{record['test_sentences']} sentences, sha256 {record['test_sha256'][:12]}")]
    if c:
        rows += [("champion compared", f"v{record['compared_with']}: {c['champion']}"),
                 ("delta (95% CI)", f"{c['delta']:+.2f} [{c['delta_95ci'][0]:+.2f}, {c['delta_95ci'][1]:+.2f}]"),
                 ("paired bootstrap p", c["p_value"])]
    summary = f"{record['alias'] or 'no alias'}: {record['reason']}"  # the registry's table shows the first line
    return summary + "\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def apply_alias(client, name: str, version: str, alias: str | None) -> None:
    if alias is None:
        return
    client.set_registered_model_alias(name, alias, version)
    other = CHALLENGER if alias == CHAMPION else CHAMPION
    holder = alias_holder(client, name, other)
    if alias == CHAMPION and holder is not None and str(holder.version) == str(version):
        client.delete_registered_model_alias(name, CHALLENGER)  # a version holds one of the two


def log_and_register(params: Params, model_file: Path, run_id: str, md5: str):
    import mlflow

    from pipeline.serving import log_translator

    with mlflow.start_run(run_id=run_id):
        info = log_translator(model_file, params)
        if Path("dvc.lock").exists():
            mlflow.log_artifact("dvc.lock", str(Path(LOCK_ARTIFACT).parent))
    # The key is tagged with the version, so a retry after any later failure finds this version.
    return mlflow.register_model(info.model_uri, params.registry.model_name,
                                 tags={"model_md5": md5, "model_key": model_key(md5, params)})


def compare_with_champion(params: Params, model_file: Path, champion, test: pd.DataFrame) -> tuple[float, dict | None]:
    """The new model's test score and, when there is a champion, the paired comparison."""
    cfg = params.registry
    references = test["tgt"].tolist()
    new = test_translations(params, model_file, test)
    if champion is None:
        return round(metrics.corpus_score(cfg.metric, new, references, params.prepare.tgt_lang), 2), None
    with tempfile.TemporaryDirectory() as tmp:
        champion_file = model_checkpoint(f"models:/{cfg.model_name}/{champion.version}", Path(tmp))
        old = test_translations(params, champion_file, test)
    comparison = paired_bootstrap(cfg.metric, new, old, references, cfg.bootstrap_samples, params.seed,
                                  params.prepare.tgt_lang)
    return comparison["new"], comparison


@contextmanager
def one_register_at_a_time():
    """Held while a registration finds or makes its version and moves the aliases. `dvc queue
    start -j 2` runs two at once, and MLflow does neither step atomically: both could miss the
    version the other is making and make two, and two moves of one alias fail on a unique
    constraint. Queued experiments run in copies under .dvc/tmp/exps/: the lock file is in the
    workspace they share."""
    from filelock import FileLock, Timeout

    path = workspace_root() / ".vamos" / "register.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=REGISTER_WAIT_SECONDS)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another `vamos register` to finish (%s)", path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def register(params: Params, model_file: Path, run_id: str, test: pd.DataFrame) -> dict:
    """Register the model (or find it registered), compare it with the champion, set its alias.
    Returns the record that also goes to the version's description, its run and registry.json."""
    with one_register_at_a_time():
        return _register(params, model_file, run_id, test)


def _register(params: Params, model_file: Path, run_id: str, test: pd.DataFrame) -> dict:
    from mlflow import MlflowClient

    cfg = params.registry
    mlflow_setup(cfg.experiment)
    client = MlflowClient()
    md5, test_sha = file_md5(model_file), test_set_sha256(test)
    existing = registered_version(client, cfg.model_name, model_key(md5, params))
    champion = alias_holder(client, cfg.model_name, CHAMPION)
    is_champion = existing is not None and champion is not None and str(champion.version) == str(existing.version)
    key = decision_key(params, None if is_champion else champion.version if champion else None, test_sha)
    if existing is not None and existing.tags.get("decision_key") == key:
        # Decided before against this champion, test set and settings. Aliases are re-applied only
        # when that registration was cut short: a person may have moved them since, on purpose.
        record = json.loads(existing.tags["promotion"])
        if existing.tags.get("alias_applied") != "true":
            publish(client, cfg.model_name, existing, record)
        log.info("%s version %s: decision unchanged (%s)", cfg.model_name, existing.version, record["reason"])
        return record

    if is_champion:  # today's test split or settings are new: score the champion again, alone
        score, comparison = compare_with_champion(params, model_file, None, test)
        decision = Decision(CHAMPION, f"the champion, scored on the current test split: {cfg.metric} {score:.2f}")
    elif champion is not None and champion.tags.get("model_md5") == md5:
        score, comparison = compare_with_champion(params, model_file, None, test)
        decision = Decision(CHAMPION, f"the champion's weights (v{champion.version}) with new search or serving settings")
    else:
        log.info("scoring the new model%s on %d test sentences", " and the champion" if champion else "", len(test))
        score, comparison = compare_with_champion(params, model_file, champion, test)
        decision = decide(params, score, comparison)
    experiment = experiment_name()
    if experiment and decision.alias == CHAMPION and not is_champion:
        # Its params are not committed, and its outputs are not pushed: it could not be restored.
        decision = Decision(CHALLENGER, f"{decision.reason}; but it was trained in DVC experiment {experiment!r}, "
                                        f"which never becomes champion: `dvc exp apply {experiment}`, commit, run again")
    version = existing or log_and_register(params, model_file, run_id, md5)
    record = {"model": cfg.model_name, "version": int(version.version), "alias": decision.alias,
              "reason": decision.reason, "metric": cfg.metric, "score": score,
              "compared_with": int(champion.version) if champion and comparison else None, "comparison": comparison,
              "test_sha256": test_sha, "test_sentences": len(test), "decode": json.loads(decode_settings(params)),
              "run_id": version.run_id, "model_md5": md5}
    # The decision's key last: a version that has it has every other tag of the decision.
    for tag, value in {**version_tags(params, md5, record, model_file), "promotion": json.dumps(record),
                       "alias_applied": "false", "decision_key": key}.items():
        client.set_model_version_tag(cfg.model_name, version.version, tag, value)
    publish(client, cfg.model_name, version, record)
    log.info("%s version %s -> %s (%s)", cfg.model_name, version.version, decision.alias or "no alias", decision.reason)
    return record


def logged_model_id(version) -> str | None:
    """The MLflow 3 logged model a version was registered from (`models:/m-...`), if any."""
    return version.source.removeprefix("models:/") if version.source.startswith("models:/m-") else None


def publish(client, name: str, version, record: dict) -> None:
    """What a decision shows (the version's description, the record on its run) and its alias;
    marked done last, so that a retry after a cut anywhere before does all of it again."""
    client.update_model_version(name, version.version, description=describe(record))
    log_to_run(client, version, record)
    apply_alias(client, name, version.version, record["alias"])
    client.set_model_version_tag(name, version.version, "alias_applied", "true")


def log_to_run(client, version, record: dict) -> None:
    """The decision on the version's run; the score also on its logged model, with the test split
    as the dataset it was judged on (by its md5), which the version's model page shows."""
    run_id = version.run_id
    client.log_dict(run_id, record, f"registry/version-{record['version']}.json")
    client.set_tag(run_id, "registry.decision", f"v{record['version']}: {record['alias'] or 'no alias'}")
    judged_on = {}
    if storage.split_path("test").exists():  # the split `register` scored, where the stage runs
        test = split_dataset("test")
        judged_on = {"dataset_name": test.name, "dataset_digest": test.digest}
    client.log_metric(run_id, f"registry_{record['metric']}", record["score"], model_id=logged_model_id(version),
                      **judged_on)
    if record["comparison"]:
        for key, value in {"registry_champion_score": record["comparison"]["champion"],
                           "registry_delta": record["comparison"]["delta"],
                           "registry_p_value": record["comparison"]["p_value"]}.items():
            client.log_metric(run_id, key, value)
