"""Command-line parsing shared by every entry point: typed dataclasses parsed by `HfArgumentParser`, with a
YAML file (`--config path.yaml`) supplying defaults that command-line flags then override."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml
from transformers import HfArgumentParser


def split_config_flag(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Pull `--config PATH` (or `--config=PATH`) out of argv."""
    rest, config = [], None
    iterator = iter(argv)
    for item in iterator:
        if item == "--config":
            config = next(iterator, None)
            if config is None:
                raise ValueError("--config needs a YAML file path.")
        elif item.startswith("--config="):
            config = item.split("=", 1)[1]
        else:
            rest.append(item)
    return config, rest


def read_yaml_options(path: str | os.PathLike, sections: Iterable[str] = ()) -> dict:
    """A YAML mapping of option -> value; values of the named `sections` (mappings) are merged in flat."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file.")
    content = yaml.safe_load(path.read_text()) or {}
    if not isinstance(content, dict):
        raise ValueError(f"{path} must be a YAML mapping of option: value, got {type(content).__name__}.")
    flat: dict = {}
    for key, value in content.items():
        flat.update(value if key in sections and isinstance(value, dict) else {key: value})
    return flat


def check_known_options(
    options: dict, parser: HfArgumentParser, source: str | os.PathLike | None, help_command: str, hint: str = ""
) -> None:
    """Reject option names the parser does not have, naming them and where to find the list (plus `hint`)."""
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"Unknown option(s) in {source}: {', '.join(unknown)}. Run `{help_command} --help` for the list{hint}."
        )


def set_option_defaults(parser: HfArgumentParser, options: dict) -> None:
    """Make `options` the parser's defaults; options given this way are no longer required on the command line."""
    parser.set_defaults(**options)
    for action in parser._actions:
        if action.dest in options:
            action.required = False


def parse_with_config(
    parser: HfArgumentParser, argv: Sequence[str] | None, help_command: str, sections: Iterable[str] = ()
) -> tuple:
    """Parse argv into the parser's dataclasses, `--config` YAML values first, flags on top."""
    config_path, rest = split_config_flag(sys.argv[1:] if argv is None else argv)
    if config_path is not None:
        options = read_yaml_options(config_path, sections)
        check_known_options(options, parser, config_path, help_command)
        set_option_defaults(parser, options)
    return tuple(parser.parse_args_into_dataclasses(args=rest, look_for_args_file=False))
