"""The MLflow UI in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium)
against a real `mlflow server` on loopback: a finished training run with its metrics, system metrics
and confusion matrix, its logged model, a search's parent run with its trials and their score against
a hyperparameter, the registered model with its `champion` alias, and the experiment opening in the
model-training view. Screenshots go to test-artifacts/ui/."""

from __future__ import annotations

import re
import shutil
import time

import mlflow
import pytest
from PIL import Image

from conftest import PROJECT_ROOT, TrackingServer, make_npz
from experiments.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, ui_link
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


def wait_for_script(driver, name: str, script: str, done, what: str):
    """Wait until `done(result of script)`; returns that result. On a timeout, a `name`-failed screenshot."""
    try:
        return WebDriverWait(driver, TIMEOUT, poll_frequency=0.5).until(
            lambda d: (lambda result: result if done(result) else None)(d.execute_script(script)))
    except TimeoutException:
        screenshot(driver, f"{name}-failed")
        pytest.fail(f"{driver.current_url} never showed {what} in {TIMEOUT} s; it shows:\n{body_text(driver)[:3000]}")


def choose(driver, select_id: str, label: str, value: str) -> None:
    """Pick `label` in the UI's select `select_id`: a parameter and a metric may share a label (learning_rate
    is both on a trial), so the option is the one after which the select holds `value` (param-x, metric-y)."""
    for attempt in range(3):
        driver.find_element(By.ID, select_id).click()
        options = WebDriverWait(driver, TIMEOUT).until(lambda d: [
            o for o in d.find_elements(By.CSS_SELECTOR, "[role=listbox] [role=option]") if o.text.strip() == label])
        option = options[min(attempt, len(options) - 1)]
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", option)
        option.click()
        try:
            WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, select_id).get_attribute("value") == value)
            return
        except TimeoutException:
            continue
    screenshot(driver, f"{select_id}-failed")
    pytest.fail(f"{select_id} never held {value} after choosing {label!r}")


def coloured_pixels(png: bytes) -> int:
    """Pixels of a saturated colour (a plotted point; axes, grid and labels are grey)."""
    import io

    with Image.open(io.BytesIO(png)) as image:
        return sum(count for count, (r, g, b) in image.convert("RGB").getcolors(maxcolors=1 << 24)
                   if max(r, g, b) - min(r, g, b) > 80)


def test_mlflow_ui_shows_the_run_the_search_and_the_champion_in_headless_chromium(tmp_path, monkeypatch, browser,
                                                                                    empty_store):
    started = time.time()
    # No telemetry (TrackingServer already leaves out the job runner): the UI needs neither.
    quiet = {"MLFLOW_DISABLE_TELEMETRY": "true"}
    server = TrackingServer(tmp_path / "server", empty_store, env=quiet).start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        # System metrics every 0.5 s (the project's default is 2 s): the few seconds of the tiny run get samples.
        monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
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
        experiments = {name: client.get_experiment_by_name(name) for name in ("mnist", "cifar10")}
        for experiment in experiments.values():
            assert experiment.tags.get(EXPERIMENT_KIND_TAG) == EXPERIMENT_KIND, (experiment.name, experiment.tags)
        system = sorted(k for k in run.data.metrics if k.startswith("system/"))
        assert "system/cpu_utilization_percentage" in system, f"the training run logged no system metrics: {system}"
        samples = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
        assert len(samples) >= 2, f"{len(samples)} samples of system/cpu_utilization_percentage: no line to draw"
        # The training's logged model (promote logs a second one, `serving`, to the same run).
        [model] = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id], output_format="list",
            filter_string=f"source_run_id = '{run.info.run_id}' AND name = 'model'")
        [model_accuracy] = [m for m in model.metrics if m.key == "test_accuracy"] or [None]
        assert model_accuracy, f"logged model {model.model_id} has no test_accuracy: {[m.key for m in model.metrics]}"
        assert model_accuracy.value == run.data.metrics["test_accuracy"]

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
        run_accuracy = re.search(r"^test_accuracy\n([-+0-9.e]+)$", text, re.M).group(1)  # as the UI shows it

        # 1b. Its system metrics tab: a chart per system metric, each drawing its samples as a line.
        open_page(browser, server, f"{run_route}/system-metrics")
        text = wait_for_text(browser, "training-run-system-metrics", re.compile(rf"System metrics\s*\({len(system)}\)"),
                             *(f"{run.info.run_name} ({key})" for key in system))
        assert "No charts in this section" not in text
        for key in system:  # each chart is titled with the metric's name
            assert re.search(rf"^{re.escape(key.removeprefix('system/'))}$", text, re.M), f"no chart for {key}"
        lines = "return [...document.querySelectorAll('.js-plotly-plot')].map(p => [p.closest('[data-testid]')" \
                "?.innerText.split('\\n')[0], [...p.querySelectorAll('.scatterlayer path.js-line')]" \
                ".some(l => (l.getAttribute('d') || '').includes('L'))])"  # a line through 2 samples or more
        drawn = wait_for_script(browser, "training-run-system-metrics", lines,
                                lambda charts: charts and len(charts) == len(system) and all(d for _, d in charts),
                                f"{len(system)} system metric charts with lines")
        assert "cpu_utilization_percentage" in {title for title, _ in drawn}, drawn
        screenshot(browser, "training-run-system-metrics")  # again, now that every line is drawn

        # 1c. Its logged model's page (the experiment's Models tab links to it): the run's test_accuracy,
        # on the test split's dataset. The page's metrics table scrolls: its search box shows the one row.
        open_page(browser, server, f"experiments/{run.info.experiment_id}/models/{model.model_id}")
        wait_for_text(browser, "logged-model", model.model_id, "Metrics (", run.info.run_name)
        browser.find_element(By.CSS_SELECTOR, "input[placeholder='Search metrics']").send_keys("test_accuracy")
        text = wait_for_text(browser, "logged-model", re.compile(r"^test_accuracy$", re.M),
                             model_accuracy.dataset_name)
        row = re.search(rf"^test_accuracy\n(.*)\n{re.escape(run.info.run_name)}\n([-+0-9.e]+)$", text, re.M)
        assert row, f"no test_accuracy row (metric, dataset, source run, value) on the model page:\n{text[:3000]}"
        assert model_accuracy.dataset_name in row.group(1)
        assert row.group(2) == run_accuracy, f"test_accuracy {row.group(2)} on the model, {run_accuracy} on the run"
        assert float(row.group(2)) == pytest.approx(run.data.metrics["test_accuracy"], abs=5e-5)

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

        # 3b. Its trials compared (the runs table's Compare): a scatter plot of score against learning_rate,
        # a point per trial, drawn (plotly's WebGL scatter: the points are pixels, not SVG elements).
        trial_ids = ",".join(f'"{c.info.run_id}"' for c in children)
        open_page(browser, server, f'compare-runs?runs=[{trial_ids}]&experiments=["{parent.info.experiment_id}"]')
        wait_for_text(browser, "search-trials-scatter", f"Comparing {len(children)} Runs", "Scatter Plot",
                      *(c.info.run_name for c in children))
        browser.find_element(By.XPATH, "//button[@role='tab'][normalize-space()='Scatter Plot']").click()
        choose(browser, "x-axis-selector", "learning_rate", "param-learning_rate")
        choose(browser, "y-axis-selector", "score", "metric-score")
        plot = "const p = document.querySelector('[role=tabpanel][data-state=active] .js-plotly-plot');" \
               "return p && p.data && [p.querySelector('.xtitle')?.textContent," \
               " p.querySelector('.ytitle')?.textContent," \
               " p.data.flatMap(t => t.x.map((x, i) => [Number(x), t.y[i]]))]"
        shown = wait_for_script(browser, "search-trials-scatter", plot,
                                lambda p: p and p[:2] == ["learning_rate", "score"] and len(p[2]) == len(children),
                                "a scatter plot of score against learning_rate")
        expected = sorted((float(c.data.params["learning_rate"]), c.data.metrics["score"]) for c in children)
        assert [pytest.approx(point) for point in expected] == sorted(map(tuple, shown[2])), (shown[2], expected)
        figure = browser.find_element(By.CSS_SELECTOR, "[role=tabpanel][data-state=active] .js-plotly-plot")
        try:  # the points drawn, in the plot's own colour
            WebDriverWait(browser, TIMEOUT).until(lambda _: coloured_pixels(figure.screenshot_as_png) > 20)
        except TimeoutException:
            screenshot(browser, "search-trials-scatter-failed")
            pytest.fail("the scatter plot of score against learning_rate draws no points")
        screenshot(browser, "search-trials-scatter")

        # 4. The registered model: the champion alias on the promoted version.
        open_page(browser, server, "models/mnist")
        text = wait_for_text(browser, "registered-model", "mnist", f"Version {champion.version}",
                             re.compile(r"@\s*champion"), "Image classifier for mnist")
        assert re.search(r"source_run\s*:\s*" + run.info.run_id[:8], text)

        # 5. The experiment, through the project's link (a fresh browser: no view chosen in the sidebar yet;
        # MLflow 3.17 picks the view per browser, not from the experiment's kind tag): the model-training
        # view (its Runs and Models, the runs table), not GenAI's (Overview, Sessions, Judges, Prompts,
        # Agent versions). Last: a failure here hides no other page's check.
        mnist = experiments["mnist"].experiment_id
        browser.get(ui_link(server.uri, mnist))
        settled = rf"#/experiments/{mnist}/\w"  # the experiment page has chosen its landing tab
        landed = wait_for_script(
            browser, "experiment", "return [location.href, document.body.innerText]",
            lambda r: re.search(settled, r[0]) and ("Run Name" in r[1] or "Agent versions" in r[1]),
            "either view of the experiment")
        screenshot(browser, "experiment")
        url, text = landed
        genai = [t for t in ("Agent versions", "Sessions", "Judges", "Token Usage") if re.search(rf"^{t}$", text, re.M)]
        assert f"/experiments/{mnist}/runs" in url and "workflowType=genai" not in url and not genai, (
            f"experiment mnist (tagged {EXPERIMENT_KIND_TAG}={EXPERIMENT_KIND}) opened at {url}, not in the "
            f"model-training view; GenAI's {genai} are shown:\n{text[:1500]}")
        text = wait_for_text(browser, "experiment", run.info.run_name, "Run Name")
        assert re.search(r"^Runs$", text, re.M) and re.search(r"^Models$", text, re.M), text[:1500]
    finally:
        server.stop()

    for name in ("training-run", "training-run-system-metrics", "training-run-confusion-matrix", "logged-model",
                 "search-parent-run", "search-trials-scatter", "registered-model", "experiment"):
        assert_real_screenshot(name)
    print(f"content made in {made - started:.0f} s, pages checked in {time.time() - made:.0f} s")
