"""The MLflow UI path, as users take it, in a real browser: headless Debian Chromium driven by
Playwright (no browser download) against `mlflow ui` on 127.0.0.1, over a store holding two
trained versions of vamos-en-es.

Compare the two runs side by side with their test BLEU, see the `champion` alias, move it to
the other version in the version page's alias editor, then check that `vamos translate` and a
new `vamos register` follow the hand-picked champion. Screenshots go to $VAMOS_TEST_ARTIFACTS
(default tests/artifacts/, git-ignored)/mlflow_ui/.

Set up by scripts/setup.sh: Debian's `chromium` (apt) and `playwright` (the [test] extra)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from pipeline.config import load_params
from pipeline.stages import STAGES
from tests.conftest import REPO, free_port, run, stop, wait_healthy

pytestmark = pytest.mark.slow

NAME, EXPERIMENT, CHAMPION = "vamos-en-es", "vamos", "champion"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
ALIAS_TAG = re.compile(rf"^@\s*{CHAMPION}$")  # the UI writes "@&nbsp;champion"
CHROMIUM = os.environ.get("VAMOS_CHROMIUM", "/usr/bin/chromium")
# The flags this machine's closed network needs: no background networking, no phoning home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UI_TIMEOUT_MS = 30_000  # every wait on the page is bounded by this (navigation: twice this)


def artifacts_dir() -> Path:
    path = Path(os.environ.get("VAMOS_TEST_ARTIFACTS") or REPO / "tests" / "artifacts") / "mlflow_ui"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def mlflow_ui(db: Path, log_file: Path):
    """`mlflow ui` over the SQLite store. Runs keep their absolute local artifact locations
    (mlruns/ beside the store, as the stages wrote them), which the server reads and serves."""
    port = free_port()
    with open(log_file, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db}",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/health", server, log_file)
        yield url
    finally:
        stop(server)


@contextlib.contextmanager
def chromium_page(login: tuple[str, str] | None = None):
    """A headless Chromium page; with `login` (user, password), it answers the server's basic-auth
    challenge as a person's browser does once they typed it in."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: run `bash scripts/setup.sh` (it installs the [test] extra)")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/setup.sh` (it installs Debian's chromium)")
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000},
            http_credentials=dict(zip(("username", "password"), login)) if login else None)
        try:
            page = context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.set_default_navigation_timeout(2 * UI_TIMEOUT_MS)
            try:
                yield page
            except BaseException:
                with contextlib.suppress(Exception):  # what the page showed when a step failed
                    page.screenshot(path=str(artifacts_dir() / "failure.png"))
                    print(f"\nscreenshot of the failure: {artifacts_dir() / 'failure.png'}")
                raise
        finally:
            context.close()


def shot(page, name: str, shots: list[Path]) -> Path:
    path = artifacts_dir() / name
    page.screenshot(path=str(path))
    shots.append(path)
    return path


def close_assistant(page) -> None:
    """MLflow 3's assistant panel takes a third of the page: close it when it is open."""
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.count() and close.first.is_visible():
        close.first.click()


# The compare page's metrics table is two virtualised grids side by side: metric names, and one
# value cell per run. In MLflow 3.17 the names do not follow when the values are scrolled (seen in
# this test's screenshots), so each is scrolled to the same place, values first, as one table.
SCROLL_GRID = """([index, top]) => {
    const grids = [...document.querySelectorAll('.ReactVirtualized__Grid')]
        .sort((a, b) => a.getBoundingClientRect().left - b.getBoundingClientRect().left);
    grids[index].scrollTop = top;
    return grids[index].scrollHeight;
}"""
METRIC_ROW = """(label) => {
    const name = [...document.querySelectorAll('.ReactVirtualized__Grid div[style*="top"]')]
        .find(e => e.textContent.trim() === label);
    if (!name) return null;
    const grid = name.closest('.ReactVirtualized__Grid');
    const values = [...document.querySelectorAll('.ReactVirtualized__Grid')]
        .find(g => g !== grid && g.getBoundingClientRect().left > grid.getBoundingClientRect().left);
    const cells = [...values.querySelectorAll('[style*="top"]')].filter(c => c.style.top === name.style.top)
        .sort((a, b) => parseFloat(a.style.left) - parseFloat(b.style.left));
    const box = grid.getBoundingClientRect(), at = name.getBoundingClientRect();
    return {top: parseFloat(name.style.top), visible: at.top >= box.top - 1 && at.bottom <= box.bottom + 1,
            offset: cells.length ? Math.abs(cells[0].getBoundingClientRect().top - at.top) : null,
            values: cells.map(c => c.textContent.trim())};
}"""


def scroll_metrics(page, top: int) -> int:
    height = 0
    for grid in (1, 0):  # the values, then the names
        height = max(height, page.evaluate(SCROLL_GRID, [grid, top]))
        page.wait_for_timeout(300)
    return height


def metric_row(page, label: str) -> list[str]:
    """Bring `label`'s row of the compare page's metrics table into view; its values, one a run."""
    page.get_by_text("Metrics", exact=True).first.scroll_into_view_if_needed()
    assert page.locator(".ReactVirtualized__Grid").count() == 2, "the compare page's metrics table changed"
    top, row = 0, page.evaluate(METRIC_ROW, label)
    while row is None:  # not rendered yet: page down until it is
        height = scroll_metrics(page, top)
        row = page.evaluate(METRIC_ROW, label)
        assert row is not None or top < height, f"no {label} row in the compared metrics"
        top += 200
    scroll_metrics(page, row["top"])
    row = page.evaluate(METRIC_ROW, label)
    assert row and row["visible"] and row["offset"] is not None and row["offset"] < 3, row
    return row["values"]


def train_again(root: Path, seed: int) -> None:
    """Another, different model in the same workspace: a new seed retrains from scratch (fewer
    epochs: it only has to be a different model)."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["seed"] = seed
    params["train"]["epochs"] = min(params["train"]["epochs"], 4)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    loaded = load_params()
    STAGES["train"](loaded)
    STAGES["evaluate"](loaded)


def vamos(*args: str, cwd: Path, timeout: int = 300):
    # The installed command, as users type it (conftest puts this interpreter's scripts on PATH).
    result = run([str(Path(sys.executable).parent / "vamos"), *args], cwd, timeout=timeout)
    assert result.returncode == 0, f"vamos {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    return result


def give_alias_in_ui(page, version: str, holder: str, name: str = NAME, alias: str = CHAMPION,
                     keep_own_aliases: bool = False):
    """In the version page's alias editor, give `version` the alias that `holder` has (removing the
    version's own aliases unless `keep_own_aliases`), and save; returns the editor (it closes when
    the server accepted the change)."""
    page.get_by_role("link", name=f"Version {version}", exact=True).first.click()
    page.get_by_role("heading", name=f"Version {version}").wait_for()
    page.get_by_title(re.compile(r"^(Add|Edit) aliases$")).click()
    editor = page.get_by_role("dialog")
    editor.get_by_text(f"Add/Edit alias for model version {version}").wait_for()
    chips = editor.locator('[data-component-type="tag"] button')  # its own aliases (challenger)
    for _ in range(0 if keep_own_aliases else 5):
        if not chips.count():
            break
        chips.first.click()
    editor.get_by_role("combobox").fill(alias)
    editor.get_by_role("combobox").press("Enter")
    editor.get_by_text(f'The "{alias}" alias is also being used on version {holder}').wait_for()
    editor.get_by_role("button", name="Save aliases").click()
    return editor


def open_registered_model(page, url: str, name: str = NAME) -> None:
    """The registered model's page, from the registry's list (its alias-based view once offered).
    A server with workspaces first asks for one: the `default` one, where vamos's clients work."""
    page.goto(url)
    registry, workspace = (page.get_by_role("link", name=text, exact=True) for text in ("Model registry", "default"))
    training = page.get_by_role("button", name="Model training", exact=True)  # the registry is in this view
    registry.or_(training).or_(workspace).first.wait_for()
    if not (registry.count() or training.count()):
        workspace.first.click()
        registry.or_(training).first.wait_for()
    if not registry.count():
        training.click()
    registry.first.click()
    with contextlib.suppress(Exception):  # MLflow offers its alias-based registry UI once
        page.get_by_role("dialog").get_by_role("button", name="Try it now").click(timeout=5_000)
    page.get_by_role("link", name=name, exact=True).first.click()
    page.get_by_role("heading", name=name).wait_for()


def test_compare_and_promote_in_the_mlflow_ui(trained_copy, tmp_path, capsys):
    root, client = trained_copy, MlflowClient()

    # A second, different model: trained with another seed, evaluated and registered by the CLI.
    train_again(root, load_params().seed + 1)
    vamos("register", cwd=root)
    versions = {v.version: v for v in client.search_model_versions(f"name='{NAME}'")}
    assert len(versions) == 2, versions
    champion = client.get_model_version_by_alias(NAME, CHAMPION)
    target = next(v for number, v in versions.items() if number != champion.version)  # hand-picked below
    runs = {v.run_id: client.get_run(v.run_id) for v in versions.values()}
    assert len(runs) == 2 and all("test_bleu" in r.data.metrics for r in runs.values())

    experiment = client.get_experiment_by_name(EXPERIMENT)
    key, kind = EXPERIMENT_KIND
    assert experiment.tags.get(key) == kind, "the vamos experiment must be marked as model development"

    shots: list[Path] = []
    with mlflow_ui(root / "mlflow.db", tmp_path / "mlflow-ui.log") as url, chromium_page() as page:
        page.goto(url)
        # The experiment is model development, not a GenAI app: its page is its training runs.
        # (MLflow 3.17's UI picks the page from its GenAI / Model training switch, which starts on
        # GenAI in a new browser profile: a user switches it once, as here.)
        page.get_by_role("button", name="Model training", exact=True).click()
        page.get_by_role("link", name="Experiments", exact=True).first.click()
        page.get_by_role("link", name=EXPERIMENT, exact=True).first.click()
        page.wait_for_url(re.compile(rf"/experiments/{experiment.experiment_id}/runs"))
        page.get_by_text("2 matching runs").wait_for()
        page.get_by_role("columnheader", name="Run Name").first.wait_for()
        kind_seen = page.evaluate("""async (name) => (await (await fetch(
            'ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=' + name)).json())
            .experiment.tags.find(t => t.key === 'mlflow.experimentKind')?.value""", EXPERIMENT)
        assert kind_seen == kind
        close_assistant(page)
        shot(page, "01-vamos-runs.png", shots)

        # Both runs side by side, each with its test BLEU.
        page.get_by_role("checkbox", name="Select all runs").check()
        page.get_by_role("button", name="Compare", exact=True).click()
        page.get_by_text("Comparing 2 Runs").wait_for()
        for run_id in runs:
            page.get_by_text(run_id, exact=True).first.wait_for()
        close_assistant(page)
        page.get_by_text("Visualizations", exact=True).click()  # folded: the tables come up
        page.get_by_role("switch").first.click()  # parameters: show the differences only (seed)
        page.get_by_text("Metrics", exact=True).first.wait_for()
        page.set_viewport_size({"width": 1600, "height": 1800})
        shown = [float(v) for v in metric_row(page, "test_bleu") if re.fullmatch(r"-?\d+(\.\d+)?", v)]
        expected = [r.data.metrics["test_bleu"] for r in runs.values()]
        assert len(shown) == 2, shown
        assert sorted(shown) == pytest.approx(sorted(expected), abs=0.051), (shown, expected)  # 4 digits shown
        compare_png = shot(page, "02-compare-runs-test-bleu.png", shots)
        page.set_viewport_size({"width": 1600, "height": 1000})

        # The registered model, with its champion.
        open_registered_model(page, url)
        champion_row = page.get_by_role("row").filter(
            has=page.get_by_role("link", name=f"Version {champion.version}", exact=True))
        champion_row.get_by_text(ALIAS_TAG).wait_for()
        close_assistant(page)
        shot(page, "03-model-champion-before.png", shots)

        # Move the alias in the other version's alias editor.
        editor = give_alias_in_ui(page, target.version, champion.version)
        editor.wait_for(state="hidden")
        page.get_by_text(ALIAS_TAG).first.wait_for()
        page.get_by_role("link", name=NAME, exact=True).first.click()  # the breadcrumb
        moved_row = page.get_by_role("row").filter(
            has=page.get_by_role("link", name=f"Version {target.version}", exact=True))
        moved_row.get_by_text(ALIAS_TAG).wait_for()
        close_assistant(page)
        moved_png = shot(page, "04-champion-moved.png", shots)

    with capsys.disabled():
        print(f"\nMLflow UI screenshots: compare {compare_png}\n                       alias moved {moved_png}")
        for path in shots:
            print(f"  {path}")

    assert client.get_model_version_by_alias(NAME, CHAMPION).version == target.version

    # `vamos translate` (and anything loading models:/vamos-en-es@champion) follows the hand-pick.
    loaded = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION}")
    assert loaded.metadata.run_id == target.run_id
    sentences = pd.read_parquet(root / "data" / "prepared" / "test.parquet")["src"].tolist()[:20]
    translations = {model: vamos("translate", "--model", model, *sentences, cwd=root, timeout=180).stdout
                    for model in (f"models:/{NAME}@{CHAMPION}", f"models:/{NAME}/{target.version}",
                                  f"models:/{NAME}/{champion.version}")}
    by_alias, hand_picked, other = translations.values()
    assert by_alias == hand_picked
    assert hand_picked != other, "the two versions translate alike: the check above proves nothing"

    # A new model's `vamos register` compares it with the hand-picked champion.
    train_again(root, load_params().seed + 1)
    vamos("register", cwd=root)
    record = json.loads((root / "reports" / "registry.json").read_text())
    assert record["compared_with"] == int(target.version), record
    assert record["comparison"] is not None and record["version"] == len(versions) + 1
    holder = client.get_model_version_by_alias(NAME, CHAMPION).version
    assert holder == (str(record["version"]) if record["alias"] == CHAMPION else target.version)
