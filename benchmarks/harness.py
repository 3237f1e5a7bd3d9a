"""The benchmark harness: named benchmarks, each logged as an MLflow run and written into BENCHMARKS.md.

A benchmark is one decorated function that takes its options and returns table rows:

    @benchmark("peak", "matmul and conv GFLOP/s, fp32 and bf16")
    def peak(seconds: float = 3.0) -> list[dict]:
        return [{"op": "matmul", "dtype": "float32", "gflops": 812.0}]

`run()` times it inside a run of the MLflow experiment `benchmarks` (options as params, every
numeric cell as a metric, the table as an artifact), prints the table as markdown, and replaces the
benchmark's section of BENCHMARKS.md (between `<!-- benchmark:NAME -->` markers) with the table,
the machine, the date and the command. Benchmarks are never timed in pytest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import os
import platform
import re
import shlex
import tempfile
import time
from pathlib import Path
from typing import Callable

from experiments.cache import atomic_path
from experiments.cli import run_main
from experiments.errors import UserError
from experiments.tracking import PROJECT_ROOT, git_state

EXPERIMENT = "benchmarks"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    run: Callable[..., list]
    description: str


BENCHMARKS: dict[str, Benchmark] = {}


def benchmark(name: str, description: str):
    def decorate(fn):
        BENCHMARKS[name] = Benchmark(name, fn, description)
        return fn

    return decorate


def load_all() -> None:
    """Import every benchmark module: they register themselves."""
    from benchmarks import (  # noqa: F401
        ablation, cpu, determinism, distributed, evaluation, overhead, pipeline, precision, recipes, runs, serving,
        serving_ratio, speed, trust,
    )


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; choose one of: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]


def options_of(bench: Benchmark) -> dict:
    """The benchmark's options and their defaults."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(bench.run).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


def parse_options(bench: Benchmark, pairs: list[str]) -> dict:
    """`key=value` strings -> options typed like their defaults; unknown keys are a UserError."""
    defaults = options_of(bench)
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in defaults:
            raise UserError(
                f"{bench.name} takes options {', '.join(f'{k}={v}' for k, v in defaults.items()) or '(none)'}; "
                f"got {pair!r}"
            )
        kind = type(defaults[key])
        try:
            options[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            raise UserError(f"{bench.name}: option {key} must be a {kind.__name__}, got {value!r}") from None
    return options


@contextlib.contextmanager
def empty_cache():
    """A fresh, empty CNN_CACHE_DIR for the block, as on a new machine; the previous setting comes back after."""
    previous = os.environ.get("CNN_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CNN_CACHE_DIR"] = cache
        try:
            yield Path(cache)
        finally:
            os.environ.pop("CNN_CACHE_DIR") if previous is None else os.environ.update(CNN_CACHE_DIR=previous)


def machine() -> str:
    from experiments.precision import cpu_model

    cpu = cpu_model()
    memory = ""
    try:
        kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        memory = f", {kib / 2**20:.0f} GB"
    except (OSError, AttributeError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{memory}, Python {platform.python_version()}"


def git_commit() -> str:
    """The short commit hash, as BENCHMARKS.md quotes it ("unknown" without git)."""
    commit = git_state()["git_commit"]
    return commit if commit == "unknown" else commit[:7]


def markdown_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def update_benchmarks_md(name: str, body: str, path: Path = PROJECT_ROOT / "BENCHMARKS.md") -> None:
    """Replace the text between the benchmark's markers, or append a new section."""
    start, end = f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"
    section = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n### `{name}`\n\n{section}\n"
    with atomic_path(path) as staging:
        staging.write_text(text)


def run(name: str, options: dict | None = None, benchmarks_md: Path | None = PROJECT_ROOT / "BENCHMARKS.md") -> list[dict]:
    """Run one benchmark tracked in MLflow; print its table; write it into `benchmarks_md` (None: do not)."""
    import mlflow

    from experiments.tracking import connect, use_experiment

    bench = get_benchmark(name)
    options = {**options_of(bench), **(options or {})}
    command = "python -m benchmarks run " + " ".join(  # quoted, so that it pastes into a shell (JSON options)
        [name] + [shlex.quote(f"{k}={v}") for k, v in options.items() if v != options_of(bench)[k]]
    )
    connect()
    use_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=name, description=bench.description) as active:
        mlflow.set_tags({"benchmark": name, "git_commit": git_commit(), "machine": machine()})
        mlflow.log_params({**options, "command": command})
        start = time.perf_counter()
        rows = bench.run(**options)
        wall = time.perf_counter() - start
        mlflow.log_metric("wall_s", wall)
        for n, row in enumerate(rows):
            # A row is named by its leading cells (what was measured); its floats are the metrics.
            leading = []
            for key, value in row.items():
                if isinstance(value, float):
                    break
                leading.append(value if isinstance(value, str) else f"{key}{value}")
            label = "_".join(leading)
            for key, value in row.items():
                if isinstance(value, float):
                    mlflow.log_metric(_metric_name(f"{label}_{key}" if label else f"{n}_{key}"), value)
        mlflow.log_table({k: [row.get(k) for row in rows] for k in dict.fromkeys(k for r in rows for k in r)},
                         f"{name}.json")
        run_id = active.info.run_id
    table = markdown_table(rows)
    print(f"\n{bench.description}\n\n{table}\n\n{wall:.0f} s, MLflow run {run_id}", flush=True)
    if benchmarks_md is not None:
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        update_benchmarks_md(name, f"{bench.description}.\n\n- Machine: {machine()}.\n- Date: {date}, commit "
                             f"{git_commit()}, {wall:.0f} s, MLflow run `{run_id}`.\n- Command: `{command}`\n\n{table}",
                             benchmarks_md)
    return rows


def _metric_name(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z.]+", "_", text).strip("_")[:250]


def main(argv: list[str] | None = None) -> int:
    import argparse

    load_all()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Run named benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the benchmarks and their options")
    run_parser = sub.add_parser("run", help="run one benchmark: python -m benchmarks run NAME [key=value ...]")
    run_parser.add_argument("name")
    run_parser.add_argument("options", nargs="*", metavar="key=value")
    run_parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)

    def body():
        if args.command == "list":
            for bench in sorted(BENCHMARKS.values(), key=lambda b: b.name):
                options = " ".join(f"{k}={v}" for k, v in options_of(bench).items())
                print(f"{bench.name:20} {bench.description}  [{options}]")
            return
        bench = get_benchmark(args.name)
        run(bench.name, parse_options(bench, args.options), None if args.no_write else PROJECT_ROOT / "BENCHMARKS.md")

    return run_main(body)
