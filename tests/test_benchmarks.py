"""The benchmark harness on tiny settings: runs are logged, tables printed, BENCHMARKS.md sections written.

Timings are never asserted here; only that each benchmark measures and records what it says.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import mlflow
import pytest

from benchmarks import cpu, harness, recipes, runs
from conftest import PROJECT_ROOT, python_env, trained
from experiments.errors import UserError

harness.load_all()


@pytest.mark.slow
def test_list_names_every_benchmark_with_its_options():
    out = subprocess.run([sys.executable, "-m", "benchmarks", "list"], cwd=PROJECT_ROOT, env=python_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "peak" in out.stdout and "tracking_overhead" in out.stdout and "repeats=3" in out.stdout
    assert "seed_runs" in out.stdout and "tuning_runs" in out.stdout


@pytest.mark.slow
def test_bad_names_and_options_are_one_line_errors():
    out = subprocess.run([sys.executable, "-m", "benchmarks", "run", "nope"], cwd=PROJECT_ROOT, env=python_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if line.startswith("error:")] == [
        f"error: unknown benchmark 'nope'; choose one of: {', '.join(sorted(harness.BENCHMARKS))}"
    ]
    bench = harness.get_benchmark("peak")
    assert harness.parse_options(bench, ["seconds=0.5", "size=64"]) == {"seconds": 0.5, "size": 64}
    with pytest.raises(UserError, match="peak takes options seconds=5.0"):
        harness.parse_options(bench, ["secs=1"])
    with pytest.raises(UserError, match="option size must be a int, got 'big'"):
        harness.parse_options(bench, ["size=big"])
    with pytest.raises(UserError, match="option options: not valid JSON"):
        harness.run("cifar10_airbench_short", {"options": "{zoom: 0.4}"}, None)


def test_peak_is_logged_cached_and_written_into_its_section(tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# Benchmarks\n\nIntro.\n\n<!-- benchmark:peak -->\nold table\n<!-- /benchmark:peak -->\n\nAfter.\n")
    rows = harness.run("peak", {"seconds": 0.2, "size": 128, "batch": 2}, report)

    assert [(r["op"].split()[0], r["dtype"]) for r in rows] == [
        ("matmul", "float32"), ("conv3x3", "float32"), ("conv3x3", "float32"),
        ("matmul", "bfloat16"), ("conv3x3", "bfloat16"), ("conv3x3", "bfloat16")]
    assert [r["op"] for r in rows[1:3]] == ["conv3x3 2x32x32x128->128", "conv3x3 1x40x40x256->256"]
    assert all(r["gflops"] > 0 for r in rows)
    assert set(cpu.measured_peak()) == {"float32", "bfloat16"}

    text = report.read_text()
    assert "old table" not in text and text.startswith("# Benchmarks\n\nIntro.") and text.rstrip().endswith("After.")
    assert "| op | dtype | gflops |" in text and "python -m benchmarks run peak seconds=0.2 size=128 batch=2" in text

    run = mlflow.search_runs(experiment_names=["benchmarks"], output_format="list")[0]
    assert run.data.tags["benchmark"] == "peak" and run.data.params["size"] == "128"
    assert run.data.metrics["matmul_128x128_float32_gflops"] == pytest.approx(rows[0]["gflops"])
    assert "wall_s" in run.data.metrics
    table = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/peak.json"))
    assert len(table["data"]) == 6


@pytest.mark.slow
def test_tracking_overhead_compares_plain_fit_with_train_in_one_run(tiny_cifar, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    report = tmp_path / "BENCHMARKS.md"
    rows = harness.run("tracking_overhead", {"arch": "cnn_simple", "epochs": 1, "repeats": 2, "batch_size": 32,
                                             "data_dir": str(tiny_cifar)}, report)

    assert [r["variant"] for r in rows] == ["plain model.fit", "train() with tracking", "tracking, system metrics off"]
    assert rows[0]["ratio_to_plain"] == 1.0 and rows[1]["ratio_to_plain"] > 0
    # Same seed, data and model: the plain fit and train() learn the same thing.
    assert rows[0]["test_accuracy"] == rows[1]["test_accuracy"] == rows[2]["test_accuracy"]

    (parent,) = mlflow.search_runs(experiment_names=["benchmarks"], output_format="list",
                                   filter_string="tags.benchmark = 'tracking_overhead'")
    children = mlflow.search_runs(experiment_names=["benchmarks"], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4 and all(c.info.run_name.startswith("cifar10-cnn_simple-") for c in children)
    assert all(c.info.status == "FINISHED" and "test_accuracy" in c.data.metrics for c in children)
    # The switch reached the runs: system metrics in the tracked variant only (sampled at 0.5 s here).
    with_system = [any(k.startswith("system/") for k in c.data.metrics) for c in children]
    assert sorted(with_system) == [False, False, True, True]
    assert parent.data.metrics["train_with_tracking_ratio_to_plain"] == pytest.approx(rows[1]["ratio_to_plain"])
    assert "<!-- benchmark:tracking_overhead -->" in report.read_text()


def test_forward_flops_counts_convs_and_dense_layers():
    from experiments.models import DataSpec, create_model

    model = create_model("cnn_simple", DataSpec((28, 28, 1), 10))
    conv = 2 * 26 * 26 * 3 * 3 * 1 * 25  # 25 3x3 filters, valid padding
    assert recipes.forward_flops(model) == conv + 2 * (26 * 26 * 25) * 100 + 2 * 100 * 10


@pytest.mark.slow
def test_a_recipe_benchmark_reports_accuracy_time_and_fraction_of_peak(tiny_cifar, tmp_path):
    harness.run("peak", {"seconds": 0.1, "size": 64, "batch": 1}, None)
    rows = harness.run("cifar10_airbench_short", {"epochs": 1, "data_dir": str(tiny_cifar), "options": '{"translate_pixels": 1}',
                                                 "recipe": '{"label_smoothing": 0.1}'}, tmp_path / "B.md")

    (row,) = rows
    assert row["recipe"] == "cifar10_airbench_short" and row["epochs"] == 1 and row["target"] == "85% in 1.5 min"
    child = mlflow.get_run(row["run_id"])
    assert child.data.metrics["test_accuracy"] == pytest.approx(row["test_accuracy"])
    assert child.data.params["arch"] == "airbench_s"
    # options and recipe (JSON) reach train(), and the command in BENCHMARKS.md repeats them
    assert (child.data.params["options.translate_pixels"], child.data.params["recipe.label_smoothing"]) == ("1", "0.1")
    assert """ 'recipe={"label_smoothing": 0.1}'`""" in (tmp_path / "B.md").read_text()  # quoted for a shell
    assert row["met"] == ("yes" if row["test_accuracy"] >= 0.85 and row["wall_s"] <= 90 else "no")
    assert row["gflop_per_s"] > 0 and 0 < row["fraction_of_peak"]
    # The peak it is a fraction of is the one of the precision the run trained in.
    assert row["precision"] == child.data.params["precision_chosen"] == "float32"  # conftest: float32 was faster


@pytest.mark.slow
def test_serving_benchmark_measures_a_real_server_per_worker_count():
    rows = harness.run("serving", {"models": "", "requests": 20, "clients": "1 2", "workers": "1 2"}, None)

    assert [(r["model"], r["input"], r["workers"], r["clients"]) for r in rows] == [
        ("identity pyfunc", form, workers, clients)
        for workers in (1, 2) for form in ("pixels 32x32x3", "png 32x32x3") for clients in (1, 2)
    ]
    assert all(0 < r["p50_ms"] <= r["p99_ms"] and r["images_per_s"] > 0 for r in rows)
    (run,) = mlflow.search_runs(experiment_names=["benchmarks"], output_format="list",
                                filter_string="tags.benchmark = 'serving'")
    assert run.data.metrics["identity pyfunc_png 32x32x3_workers2_clients2_p50_ms".replace(" ", "_")] == \
        pytest.approx(rows[-1]["p50_ms"])


@pytest.fixture
def answering_server():
    """A loopback HTTP server whose POSTs answer with the status in its `status` attribute (200 first)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the load generators use it
        disable_nagle_algorithm = True  # else each answer waits ~40 ms for a delayed ACK

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(self.server.status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.status = 200
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.mark.parametrize("generator", ["wrk", "python threads"])
def test_the_load_generators_count_answers_and_refuse_failures(answering_server, generator, monkeypatch):
    from benchmarks import serving_ratio

    if generator == "wrk" and not shutil.which("wrk"):
        pytest.skip("wrk is not installed (.ci/run installs it)")
    if generator != "wrk":
        monkeypatch.setattr(serving_ratio.shutil, "which", lambda name: None)
    url = f"http://127.0.0.1:{answering_server.server_port}/invocations"

    figures = serving_ratio.load(url, b'{"inputs": [1]}', clients=2, seconds=1)

    assert figures["images_per_s"] > 10 and 0 < figures["p50_ms"] <= figures["p99_ms"]
    answering_server.status = 500
    with pytest.raises(RuntimeError, match="failed"):
        serving_ratio.load(url, b'{"inputs": [1]}', clients=2, seconds=1)


@pytest.mark.slow
def test_serving_ratio_compares_a_real_server_with_the_same_model_in_process(tiny_cifar):
    from registry.promote import promote

    run_id = trained(tiny_cifar, arch="cnn_simple", recipe={"test_time_flip": True})
    promote("cifar10")  # the default model: models:/cifar10@champion, whose training run is run_id
    rows = harness.run("serving_ratio", {"seconds": 1.0, "tta": "as_trained none"}, None)

    assert [(r["tta"], r["engine"], r["input"]) for r in rows] == [
        (tta, "mlflow models serve", form) for tta in ("flip", "none") for form in ("png", "pixels")]
    for row in rows:
        assert row["ratio"] == pytest.approx(row["served_c8_images_per_s"] / row["in_process_b8_images_per_s"])
        assert row["served_b1_p50_ms"] > 0 and row["in_process_b1_p50_ms"] > 0
    # Each level's served model is logged into the training run, as promote --tta logs it.
    served = mlflow.search_logged_models(experiment_ids=[mlflow.get_run(run_id).info.experiment_id],
                                         filter_string="name = 'serving'", output_format="list")
    assert sorted(m.tags["tta"] for m in served if m.source_run_id == run_id) == ["flip", "flip", "none"]


@pytest.mark.slow
def test_cpu_speed_measures_every_option_in_its_own_process(monkeypatch):
    from benchmarks import speed

    monkeypatch.setattr(speed, "VARIANTS", {k: speed.VARIANTS[k] for k in list(speed.VARIANTS)[:2]} | {
        "float32": speed.VARIANTS["float32"], "intra-op threads=1": speed.VARIANTS["intra-op threads=1"]})
    # Smoke size: the smallest architecture that has a float32 option, two steps of four images.
    rows = harness.run("cpu_speed", {"arch": "airbench_s", "batch_size": 4, "steps": 2}, None)

    assert [r["option"] for r in rows] == list(speed.VARIANTS)
    assert rows[0]["ratio_to_baseline"] == 1.0
    assert all(r["images_per_s"] > 0 and r["ratio_to_baseline"] == pytest.approx(r["images_per_s"] / rows[0]["images_per_s"])
               for r in rows)


def test_data_loading_compares_decode_and_cache_with_training(image_tree):
    rows = harness.run("data_loading", {"dataset": "folder", "data_dir": str(image_tree), "image_size": 32,
                                        "batch_size": 4, "train_steps": 2}, None)
    assert [r["stage"].split(":")[0] for r in rows] == ["first pass", "later epochs", "training consumption (cnn_basic, 32 px, batch 4)"]
    assert all(r["images_per_s"] > 0 for r in rows)
    assert rows[0]["ratio_to_training"] == pytest.approx(rows[0]["images_per_s"] / rows[2]["images_per_s"])


def test_vgg16_features_second_run_reads_the_cache(image_tree):
    harness.run("peak", {"seconds": 0.1, "size": 64, "batch": 1}, None)
    rows = harness.run("vgg16_features", {"dataset": "folder", "data_dir": str(image_tree), "image_size": 32,
                                          "batch_size": 4}, None)
    first, second = rows
    assert first["run"].startswith("first") and second["run"].startswith("second")
    assert first["gflop_per_s"] > 0 and first["fraction_of_fp32_peak"] > 0
    (run,) = mlflow.search_runs(experiment_names=["benchmarks"], output_format="list",
                                filter_string="tags.benchmark = 'vgg16_features'")
    assert run.data.tags["feature_cache"] == "hit"  # the second call found the features on disk


@pytest.mark.slow
def test_determinism_times_off_and_on_alternating_each_in_its_own_process(tiny_cifar, tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# Benchmarks\n\n<!-- benchmark:determinism -->\nNot run yet.\n<!-- /benchmark:determinism -->\n")
    rows = harness.run("determinism", {"arch": "cnn_simple", "epochs": 1, "repeats": 2, "batch_size": 32,
                                       "data_dir": str(tiny_cifar)}, report)

    assert [r["deterministic"] for r in rows] == ["off", "on"]
    assert rows[0]["ratio_to_off"] == 1.0 and rows[1]["ratio_to_off"] > 0
    assert all(len(r["seconds"].split(", ")) == 2 and 0 < r["min_s"] <= r["median_s"] <= r["max_s"] for r in rows)
    assert rows[1]["identical_results"] == "yes"  # deterministic: the two repeats agree to the last bit
    (run,) = mlflow.search_runs(experiment_names=["benchmarks"], output_format="list",
                                filter_string="tags.benchmark = 'determinism'")
    assert run.data.metrics["on_ratio_to_off"] == pytest.approx(rows[1]["ratio_to_off"])
    assert "| deterministic | median_s |" in report.read_text() and "Not run yet." not in report.read_text()


def test_named_runs_are_the_mlflow_run_commands_the_shell_scripts_ran():
    # tuning_runs.sh imagenette_steps ran exactly this; an override replaces a value or adds a -P.
    assert runs.mlflow_run_args(runs.TUNING_EXPERIMENT, runs.with_overrides(runs.TUNING_RUNS["imagenette_steps"], {})) == (
        "run . --env-manager local --experiment-name benchmarks-tuning -e tune_imagenette -P tuner=bayesian "
        "-P max_trials=8 -P max_epochs=10 -P limit=6000 -P image_size=128 -P time_budget_minutes=60 "
        "-P search_name=bench-imagenette-steps").split()
    assert runs.with_overrides(runs.SEED_RUNS["cifar10_cnn_modern"], {"epochs": 1, "limit": 50}) == (
        "-e cifar10 -P arch=cnn_modern -P epochs=1 -P learning_rate=0.002 -P limit=50").split()
    assert runs.with_overrides(runs.SEED_RUNS["mnist_mlp"], {"epochs": 0, "limit": 0}) == ["-e", "mnist", "-P", "arch=mlp"]
    assert set(harness.options_of(harness.get_benchmark("seed_runs"))["names"].split(",")) == set(runs.SEED_RUNS)
    with pytest.raises(UserError, match="unknown run 'nope'; choose from: mnist_mlp, mnist_cnn_simple"):
        runs.seed_runs(names="mnist_mlp,nope")  # before anything runs


@pytest.mark.slow
def test_seed_runs_times_each_named_mlflow_run_and_logs_it(tiny_npz_dir, tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    rows = harness.run("seed_runs", {"names": "mnist_mlp", "data_dir": str(tiny_npz_dir), "epochs": 1, "limit": 30},
                       report)

    (row,) = rows
    assert row["name"] == "mnist_mlp" and row["exit_code"] == 0 and row["wall_s"] > 0
    assert row["args"] == "-e mnist -P arch=mlp -P epochs=1 -P limit=30"
    assert math.isfinite(row["test_accuracy"]) and 0 <= row["test_accuracy"] <= 1
    # The mlflow run it timed, in the scripts' experiment, with the figure it printed.
    child = mlflow.get_run(row["mlflow_run"])
    assert mlflow.get_experiment(child.info.experiment_id).name == "benchmarks-seed"
    assert child.info.status == "FINISHED" and child.data.params["arch"] == "mlp"
    assert child.data.metrics["test_accuracy"] == pytest.approx(row["test_accuracy"], abs=1e-4)

    (run,) = mlflow.search_runs(experiment_names=["benchmarks"], output_format="list",
                                filter_string="tags.benchmark = 'seed_runs'")
    assert run.info.status == "FINISHED" and run.data.params["names"] == "mnist_mlp"
    assert run.data.metrics["mnist_mlp_test_accuracy"] == pytest.approx(row["test_accuracy"])
    assert "test_accuracy=" in mlflow.artifacts.load_text(f"{run.info.artifact_uri}/output/mnist_mlp.out")
    assert "<!-- benchmark:seed_runs -->" in report.read_text() and "run seed_runs names=mnist_mlp" in report.read_text()


@pytest.mark.slow
def test_the_precision_benchmark_compares_auto_s_choice_with_the_faster_precision():
    (row,) = harness.run("precision", {"archs": "mlp", "seconds": 0.05, "rounds": 1}, None)
    assert row["arch"] == "mlp" and row["input"] == "32x32x3, batch 128"
    assert row["auto_chose"] == "float32"  # what conftest's timings say; the step times below are real
    assert row["auto_ms"] == row["float32_ms"] and row["float32_ms"] > 0 and row["bfloat16_ms"] > 0
    assert row["auto_vs_faster"] == pytest.approx(row["float32_ms"] / min(row["float32_ms"], row["bfloat16_ms"]))
    assert row["within_5pct"] == ("yes" if row["auto_vs_faster"] <= 1.05 else "no")
    assert row["auto_decision_s"] > 0


@pytest.mark.slow
def test_the_airbench_ablation_trains_each_variant_once_per_seed(tiny_cifar):
    rows = harness.run("airbench_ablation", {"variants": "0,2", "seeds": "0", "epochs": 1,
                                             "data_dir": str(tiny_cifar)}, None)
    assert [r["variant"] for r in rows] == ["port as is", "uniform whole-pixel shifts, reflected"]
    shifted = mlflow.get_run(rows[1]["run_id"])
    assert shifted.data.params["options.shift"] == '"uniform"' and shifted.data.params["options.widths"] == "[32, 64, 128]"
    assert "options.shift" not in mlflow.get_run(rows[0]["run_id"]).data.params
    assert all(0 <= r["test_accuracy"] <= 1 and r["wall_s"] > 0 for r in rows)
