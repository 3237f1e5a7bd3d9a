"""Classify image files with a served or registered model and print file, label and confidence.

    python -m registry.predict photos/ cat.jpg --url http://127.0.0.1:5000      # a running server
    python -m registry.predict photos/ --model models:/cifar10@champion         # loaded locally

Files go as base64, so the model resizes and converts them exactly as it does for any client.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from experiments.cli import run_main
from experiments.datasets import IMAGE_SUFFIXES
from experiments.errors import UserError


def image_files(paths: list[str]) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path} does not exist; give image files or folders")
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {' '.join(paths)}")
    return files


def predict_files(files: list[Path], url: str = "", model: str = "", batch_size: int = 32) -> list[dict]:
    """One prediction row per file (class_index, label, confidence, probabilities), from a server or locally."""
    loaded = None if url else _load(model)
    rows = []
    for start in range(0, len(files), batch_size):
        encoded = [base64.b64encode(f.read_bytes()).decode("ascii") for f in files[start:start + batch_size]]
        if url:
            rows += _post(url, encoded)
        else:
            rows += loaded.predict(encoded)
    return rows


def _load(model: str):
    import mlflow

    from experiments.tracking import connect

    connect()
    try:
        return mlflow.pyfunc.load_model(model)
    except mlflow.exceptions.MlflowException as exc:
        raise UserError(f"cannot load {model}: {str(exc).splitlines()[0]}; run `python -m registry.promote` first?")


def _post(url: str, encoded: list[str]) -> list[dict]:
    endpoint = url.rstrip("/") + ("" if url.rstrip("/").endswith("/invocations") else "/invocations")
    request = urllib.request.Request(
        endpoint, json.dumps({"inputs": encoded}).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)["predictions"]
    except urllib.error.HTTPError as exc:
        message = json.loads(exc.read() or b"{}").get("message", exc.reason)
        raise UserError(f"{endpoint} answered {exc.code}: {message.splitlines()[-1]}") from None
    except urllib.error.URLError as exc:
        raise UserError(f"cannot reach {endpoint} ({exc.reason}); is `mlflow models serve` running?") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m registry.predict", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files or folders")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--url", default="", help="a running `mlflow models serve`, e.g. http://127.0.0.1:5000")
    source.add_argument("--model", default="models:/cifar10@champion", help="a model URI to load locally")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    def body():
        if args.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
        files = image_files(args.images)
        rows = predict_files(files, args.url, args.model, args.batch_size)
        width = max(len(str(f)) for f in files)
        print(f"{'file':<{width}}  {'label':<20} confidence")
        for path, row in zip(files, rows):
            print(f"{str(path):<{width}}  {row['label']:<20} {row['confidence']:.3f}")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
