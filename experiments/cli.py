"""What every command shares: flags from config dataclasses, and one way from an error to an exit code."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable

from experiments.errors import UserError


def run_main(body: Callable[[], int | None]) -> int:
    """Run a command's body: its exit code (None is 0), or a UserError as one `error:` line and its code."""
    try:
        return body() or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def boolean(text: str) -> bool:
    """true/false, yes/no or 1/0 (MLproject passes every parameter as a string)."""
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def json_object(text: str) -> dict:
    """A JSON object from the command line, e.g. --recipe '{"optimizer": "sgd"}'."""
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object such as '{\"optimizer\": \"sgd\"}'")
    return value


def add_config_flags(parser: argparse.ArgumentParser, config_class, skip: tuple = ()) -> None:
    """A `--field-name` flag per field of the dataclass `config_class`, typed and defaulted by the field."""
    for field in dataclasses.fields(config_class):
        if field.name in skip:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        kind = boolean if isinstance(default, bool) else json_object if isinstance(default, dict) else type(default)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=default)


def architecture_names() -> list[str]:
    """The model registry's names, read from its source: importing the registry imports Keras and
    TensorFlow, seconds that `--help` should not wait (a test checks this equals list_models())."""
    names = []
    for module in sorted(Path(__file__).with_name("models").glob("*.py")):
        for node in ast.parse(module.read_text()).body:
            decorators = [d.func if isinstance(d, ast.Call) else d for d in getattr(node, "decorator_list", [])]
            if any(isinstance(d, ast.Name) and d.id == "register_model" for d in decorators):
                names.append(node.name)
    return sorted(names)
