"""The MLflow UI in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium)
against a real `mlflow server` on loopback: a finished training run with its metrics and confusion
matrix, a search's parent run with its trials, and the registered model with its `champion` alias.
Screenshots go to test-artifacts/ui/."""

from __future__ import annotations

import re
import shutil
import time

import mlflow
import pytest
from PIL import Image

from conftest import PROJECT_ROOT, TrackingServer, make_npz
from experiments.train import TrainConfig, train
from registry import promote as registry
from tuning.search import SearchConfig, run_search

webdriver = pytest.importorskip("selenium.webdriver", reason="no selenium: pip install -r requirements.txt")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOTS = PROJECT_ROOT / "test-artifacts" / "ui"
TIMEOUT = 120  # seconds for a page to show what it should: a page took 50 s on this 2-core machine at load 18

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no chromium/chromedriver on PATH: apt-get install chromium chromium-driver",
)]


@pytest.fixture
def browser():
    """Headless Debian chromium through its own chromedriver: Selenium Manager never runs, nothing is downloaded."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2000",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def body_text(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def wait_for_text(driver, name: str, *expected: str | re.Pattern) -> str:
    """Wait until the page's visible text shows everything in `expected`; save its screenshot as `name`."""

    def missing(text: str) -> list:
        return [e for e in expected if not (e.search(text) if isinstance(e, re.Pattern) else e in text)]

    try:
        WebDriverWait(driver, TIMEOUT, poll_frequency=0.5).until(lambda d: not missing(body_text(d)))
    except TimeoutException:
        screenshot(driver, f"{name}-failed")
        text = body_text(driver)
        pytest.fail(f"{driver.current_url} never showed {missing(text)} in {TIMEOUT} s; it shows:\n{text[:3000]}")
    screenshot(driver, name)
    return body_text(driver)


def screenshot(driver, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot saved at {path}"


def assert_real_screenshot(name: str) -> None:
    """A PNG of the whole window with more than a blank page's colours in it."""
    path = SCREENSHOTS / f"{name}.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert path.stat().st_size > 20_000, f"{path} is only {path.stat().st_size} bytes"
    with Image.open(path) as image:
        assert image.width >= 1000 and image.height >= 1000, f"{path} is {image.size}"
        colours = image.convert("RGB").getcolors(maxcolors=image.width * image.height)
        assert len(colours) > 50, f"{path} has {len(colours)} colours: a blank page or a spinner"


def open_page(driver, server: TrackingServer, route: str) -> None:
    driver.get(f"{server.uri}/#/{route}")


def test_mlflow_ui_shows_the_run_the_search_and_the_champion_in_headless_chromium(tmp_path, monkeypatch, browser):
    started = time.time()
    # No telemetry, and no job-runner processes (7 huey consumers, for GenAI jobs): the UI needs neither.
    quiet = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = TrackingServer(tmp_path / "server", env=quiet).start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        mlflow.set_tracking_uri(server.uri)
        mlflow.set_registry_uri(server.uri)
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        make_npz(data_dir / "mnist.npz")
        make_npz(data_dir / "cifar10.npz", n_train=90, n_test=30, shape=(32, 32, 3), classes=3)

        # The content, made by the project's own code. The search first: train() sets the active
        # experiment (MLFLOW_EXPERIMENT_ID) to "mnist", which a later search in this process would inherit.
        # No retraining of the best trial: two child runs are what the page has to show, and it saves a training.
        run_search(SearchConfig("cifar10", tuner="random", max_trials=2, max_epochs=1, data_dir=str(data_dir),
                                retrain=False))
        trained = train(TrainConfig(dataset="mnist", arch="cnn_simple", epochs=1, data_dir=str(data_dir)))
        [decision] = registry.promote("mnist")
        assert decision.action == "champion"
        made = time.time()

        client = mlflow.MlflowClient(server.uri)
        run = client.get_run(trained.run_id)
        assert run.info.status == "FINISHED"
        artifacts = [f.path for f in client.list_artifacts(run.info.run_id, "plots")]
        [confusion] = [p for p in artifacts if p.endswith("confusion_matrix.png")]
        [parent] = client.search_runs([client.get_experiment_by_name("cifar10").experiment_id],
                                      "tags.search_role = 'parent'")
        children = client.search_runs([parent.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(c.info.run_name for c in children) == ["trial-0", "trial-1"]
        champion = client.get_model_version_by_alias("mnist", "champion")
        assert champion.run_id == run.info.run_id

        # The UI is up; then no assistant side panel over the pages (it would take a third of every
        # screenshot). The pages below are then the single-page app's own navigations.
        open_page(browser, server, "")
        wait_for_text(browser, "home", mlflow.__version__, "Recent Experiments", "cifar10", "mnist")
        browser.execute_script("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                               "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');")
        browser.refresh()

        # 1. The training run: its name, description (the note, markdown rendered), status and every metric.
        run_route = f"experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        open_page(browser, server, run_route)
        note = run.data.tags["mlflow.note.content"].replace("`", "")
        metrics = sorted(run.data.metrics)
        assert {"test_accuracy", "test_loss", "accuracy", "loss", "val_accuracy"} <= set(metrics)
        text = wait_for_text(browser, "training-run", run.info.run_name, note, "Finished",
                             f"Metrics ({len(metrics)})", *metrics)
        assert run.info.run_name.startswith("mnist-cnn_simple-")
        for name in metrics:  # each metric is a row of the table, not just a word in a tag or a param
            assert re.search(rf"^{re.escape(name)}\n[-+0-9.e]+$", text, re.M), f"no row for metric {name}"
        assert f"{run.data.metrics['test_accuracy']}" in text

        # 2. Its artifacts tab, opened at the confusion matrix: the file in the tree, and the image shown.
        open_page(browser, server, f"{run_route}/artifacts/{confusion}")
        wait_for_text(browser, "training-run-confusion-matrix", "plots", "confusion_matrix.png", confusion,
                      "learning_curves.png", "misclassified.png")
        with Image.open(client.download_artifacts(run.info.run_id, confusion, str(tmp_path))) as png:
            size = list(png.size)
        shown = "return [...document.images].filter(i => i.complete && i.getBoundingClientRect().width > 100)" \
                ".map(i => [i.naturalWidth, i.naturalHeight])"
        # The UI fetches the artifact into a blob: URL; the image shown has the confusion matrix's pixel size.
        WebDriverWait(browser, TIMEOUT).until(lambda d: size in d.execute_script(shown))
        screenshot(browser, "training-run-confusion-matrix")  # again, now that the image has loaded

        # 3. The search's parent run: its name, tags and metric, and each trial listed as a child run.
        open_page(browser, server, f"experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}")
        text = wait_for_text(browser, "search-parent-run", "cifar10-random", "Child runs", "best_score",
                             *(c.info.run_name for c in children))
        listed = re.search(r"^Child runs\n((?:.+,\n)*.+)$", text, re.M)
        assert listed and {n.strip(" ,") for n in listed.group(1).splitlines()} == {"trial-0", "trial-1"}, listed
        child_links = {a.text.strip(" ,") for a in browser.find_elements(By.CSS_SELECTOR, "a[href*='/runs/']")}
        assert {"trial-0", "trial-1"} <= child_links, child_links  # each a link to its run
        assert re.search(r"search_role\s*:\s*parent", text)

        # 4. The registered model: the champion alias on the promoted version.
        open_page(browser, server, "models/mnist")
        text = wait_for_text(browser, "registered-model", "mnist", f"Version {champion.version}",
                             re.compile(r"@\s*champion"), "Image classifier for mnist")
        assert re.search(r"source_run\s*:\s*" + run.info.run_id[:8], text)
    finally:
        server.stop()

    for name in ("training-run", "training-run-confusion-matrix", "search-parent-run", "registered-model"):
        assert_real_screenshot(name)
    print(f"content made in {made - started:.0f} s, pages checked in {time.time() - made:.0f} s")
