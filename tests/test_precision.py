"""precision: its parsing, auto's choice (stubbed timings, then real ones) and its cache, and what a run records."""

from __future__ import annotations

import json
import subprocess
import sys

import keras
import mlflow
import numpy as np
import pytest
from conftest import PROJECT_ROOT, python_env

from experiments import precision
from experiments.cache import cache_dir
from experiments.errors import UserError
from experiments.models import DataSpec, create_model
from experiments.train import TrainConfig, train

pytestmark = pytest.mark.measured_precision  # the real measure_both, with stubbed timers or real ones

def stub_timer(seconds_per_step: dict, calls: list):
    """A `timer` for precision.choose: seconds per step by Keras policy, each preparation recorded."""
    def timer(policy):
        calls.append(policy)
        return lambda: seconds_per_step[policy]
    return timer


def policies(model) -> set[str]:
    """The dtype policies of a model's layers, nested models included."""
    return {policy for layer in model.layers
            for policy in (policies(layer) if isinstance(layer, keras.Model) else {layer.dtype_policy.name})}


@pytest.mark.parametrize("name", ["auto", "float32", "bfloat16"])
def test_known_precisions_are_accepted(name):
    precision.check_precision(name, gpus=0)


def test_an_unknown_precision_is_refused_naming_the_choices():
    with pytest.raises(UserError, match=r"^unknown precision 'fp8'; choose one of: auto, float32, bfloat16, float16$"):
        precision.check_precision("fp8")


def test_float16_on_a_cpu_is_refused_saying_why():
    with pytest.raises(UserError, match="float16 needs a GPU: no GPU is visible, and a CPU runs float16 math many "
                                        "times slower than float32; use auto, bfloat16 or float32"):
        precision.check_precision("float16", gpus=0)
    precision.check_precision("float16", gpus=1)  # with a GPU it is the usual choice


def test_precision_among_architecture_options_points_to_the_parameter():
    with pytest.raises(UserError, match="precision is a parameter of the run, not an architecture option"):
        TrainConfig("cifar10", "airbench_s", options={"precision": "float32"}).validate()


@pytest.mark.parametrize("times, expected", [({"float32": 0.2, "mixed_bfloat16": 0.1}, "bfloat16"),
                                              ({"float32": 0.1, "mixed_bfloat16": 0.14}, "float32")])
def test_auto_picks_the_faster_precision_and_caches_the_measurement(times, expected):
    calls = []
    choice = precision.choose("auto", "net 32x32x3, batch 128", stub_timer(times, calls), gpus=0)
    assert choice.precision == expected and choice.policy == {"bfloat16": "mixed_bfloat16"}.get(expected, "float32")
    assert sorted(calls) == ["float32", "mixed_bfloat16"]  # each built once, timed in rounds
    assert choice.timings == {"float32": times["float32"], "bfloat16": times["mixed_bfloat16"]}
    assert choice.reason.startswith(f"auto: {expected} ") and "ms/step against" in choice.reason
    assert precision.cpu_model() in choice.reason and "measured 20" in choice.reason
    (cache_file,) = cache_dir().glob("precision-*.json")
    assert precision.machine_key() in cache_file.name

    # The same scale again: the cache answers, and nothing is built or timed.
    again = precision.choose("auto", "net 32x32x3, batch 128", stub_timer({}, calls), gpus=0)
    assert (again.precision, again.timings) == (choice.precision, choice.timings)
    assert again.reason.endswith(", cached") and len(calls) == 2
    # Another scale is measured on its own.
    precision.choose("auto", "net 32x32x3, batch 256", stub_timer(times, calls), gpus=0)
    assert len(calls) == 4 and len(json.loads(cache_file.read_text())) == 2


def test_a_damaged_cache_is_measured_again():
    calls = []
    cache_file = cache_dir() / f"precision-{precision.machine_key()}.json"
    cache_file.write_text('{"net": {"timings": {"float32": "fast"}}}')
    choice = precision.choose("auto", "net", stub_timer({"float32": 0.1, "mixed_bfloat16": 0.3}, calls), gpus=0)
    assert choice.precision == "float32" and len(calls) == 2
    assert json.loads(cache_file.read_text())["net"]["timings"] == {"float32": 0.1, "bfloat16": 0.3}


def test_each_precision_keeps_its_best_round():
    rounds = {"float32": iter([0.30, 0.10]), "mixed_bfloat16": iter([0.12, 0.20])}
    timings = precision.measure_both(lambda policy: lambda: next(rounds[policy]), rounds=2)
    assert timings == {"float32": 0.10, "bfloat16": 0.12}


def test_a_clear_first_round_is_not_repeated_past_the_budget(monkeypatch):
    """Where one precision is emulated (8-12 s a cnn_deep step here, 7-10x float32), a second round would only repeat
    the verdict; a close first round is repeated whatever it costs."""
    monkeypatch.setattr(precision, "MEASURE_BUDGET_SECONDS", 0.0)  # every first round is over budget

    def measure(float32: list, bfloat16: list) -> tuple[dict, int]:
        rounds = {"float32": iter(float32), "mixed_bfloat16": iter(bfloat16)}
        calls = []
        timings = precision.measure_both(lambda policy: lambda: calls.append(policy) or next(rounds[policy]))
        return timings, len(calls)

    assert measure([1.0, 1.0], [8.0, 0.5]) == ({"float32": 1.0, "bfloat16": 8.0}, 2)  # one round each
    assert measure([1.0, 1.0], [1.5, 0.5]) == ({"float32": 1.0, "bfloat16": 0.5}, 4)  # too close: two


def test_a_gpu_takes_float16_and_a_set_precision_is_kept_without_measuring():
    calls = []
    gpu = precision.choose("auto", "net", stub_timer({}, calls), gpus=2)
    assert gpu.precision == "float16" and gpu.policy == "mixed_float16" and "GPU" in gpu.reason
    cpu = precision.choose("bfloat16", "net", stub_timer({}, calls), gpus=0)
    assert (cpu.precision, cpu.reason) == ("bfloat16", "bfloat16: set by the run")
    assert calls == [] and not list(cache_dir().glob("precision-*.json"))


@pytest.mark.parametrize("name, policy", [("float32", "float32"), ("bfloat16", "mixed_bfloat16")])
def test_every_architecture_builds_in_a_precision_with_a_float32_softmax(name, policy):
    from experiments.models import list_models

    spec = DataSpec((32, 32, 3), 10)
    for arch in (a for a in list_models() if a != "vgg16_head"):
        model = create_model(arch, spec, precision.POLICIES[name])
        convs = [layer for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
                 and layer.name not in ("logits", "probabilities", "mirror")]  # float32 on purpose
        assert convs and {layer.dtype_policy.name for layer in convs} == {policy}, arch
        assert model.output.dtype == "float32", arch
        assert model.input.dtype == "uint8", arch
    assert keras.config.dtype_policy().name == "float32"  # the global policy is left as it was


@pytest.mark.slow
def test_a_run_records_the_precision_it_trained_in(tiny_cifar):
    result = train(dataset="cifar10", arch="airbench_s", epochs=1, batch_size=30, data_dir=str(tiny_cifar),
                   precision="bfloat16")
    run = mlflow.get_run(result.run_id)
    assert run.data.params["precision"] == "bfloat16" and run.data.params["precision_chosen"] == "bfloat16"
    assert run.data.tags["precision_reason"] == "bfloat16: set by the run"
    served = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    keras_model = mlflow.keras.load_model(f"runs:/{result.run_id}/model")
    assert "mixed_bfloat16" in policies(keras_model)  # saved with the layers, inside the test-time views
    probabilities = np.asarray(served.predict(images))
    assert probabilities.dtype == np.float32 and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3)


@pytest.mark.slow
def test_auto_measures_the_run_s_own_model_once_per_machine(tiny_cifar):
    first = train(dataset="cifar10", arch="airbench_s", epochs=1, batch_size=30, data_dir=str(tiny_cifar))
    params, tags = mlflow.get_run(first.run_id).data.params, mlflow.get_run(first.run_id).data.tags
    assert params["precision"] == "auto" and params["precision_chosen"] in ("float32", "bfloat16")
    reason = tags["precision_reason"]
    assert reason.startswith(f"auto: {params['precision_chosen']} ") and "airbench_s 32x32x3 10 classes, batch 30" in reason
    assert not reason.endswith("cached")
    cached = json.loads(next(cache_dir().glob("precision-*.json")).read_text())
    timings = cached["airbench_s 32x32x3 10 classes, batch 30"]["timings"]
    assert params["precision_chosen"] == min(timings, key=timings.get)  # the faster one, as measured
    second = train(dataset="cifar10", arch="airbench_s", epochs=1, batch_size=30, data_dir=str(tiny_cifar), seed=1)
    assert mlflow.get_run(second.run_id).data.tags["precision_reason"] == reason + ", cached"
    assert mlflow.get_run(second.run_id).data.params["precision_chosen"] == params["precision_chosen"]


@pytest.mark.slow
@pytest.mark.parametrize("value, message", [("fp8", "error: unknown precision 'fp8'"),
                                            ("float16", "error: precision float16 needs a GPU")])
def test_the_command_line_refuses_a_bad_precision_in_one_line(tiny_cifar, value, message):
    proc = subprocess.run([sys.executable, "-m", "experiments.train", "--dataset", "cifar10", "--precision", value,
                           "--data-dir", str(tiny_cifar)], cwd=PROJECT_ROOT, env=python_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message)
    assert "Traceback" not in proc.stderr
    assert not mlflow.search_runs(search_all_experiments=True).shape[0]  # refused before any run
