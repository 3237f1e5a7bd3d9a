"""Command-line flags from config dataclasses, shared by every entry point's `parse_args`."""

from __future__ import annotations

import argparse
import dataclasses
import json


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
