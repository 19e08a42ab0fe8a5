"""Command-line options generated from the config tree, and an argparse that fails in one line.

Why argparse and not jsonargparse/tyro/simple_parsing: we looked at all three. They build the same
dataclass -> option mapping, but none gives exactly the contract our users have from the prior art
(`--is_keep_training=True` and `--is_keep_training 1` both working, prior-art flat names next to dotted
sections, one-line errors with a "did you mean" and no usage dump). The bridge below is small because the
tree walk, typing and validation live in loader.py and are shared with YAML presets.
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from lowmem_train.config.errors import ConfigError
from lowmem_train.config.loader import build_config, field_table, iter_fields, suggest, takes_bare_flag, type_label
from lowmem_train.config.schema import RunConfig

SECTION_TITLES = {
    "": "run options",
    "model": "model options (--model.*)",
    "data": "data options (--data.*)",
    "eval": "evaluation options (--eval.*)",
    "lora": "LoRA adapter options (--lora.*, through peft)",
    "memory": "memory guard options (--memory.*)",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line, no usage dump) instead of printing and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def add_run_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per leaf of the config tree, grouped by section, help = docstring + default."""
    parser.add_argument(
        "--config",
        metavar="PRESET",
        default=argparse.SUPPRESS,
        help="YAML preset (a path, or a shipped name: t5_tiny, t5_small, t5_base, gpt_tiny, gpt_small, llama_tiny); "
        "options given here override it",
    )
    groups: dict[str, Any] = {}
    for info in iter_fields(RunConfig):
        section = info.name.rsplit(".", 1)[0] if "." in info.name else ""
        group = groups.get(section)
        if group is None:
            group = groups[section] = parser.add_argument_group(SECTION_TITLES.get(section, section))
        default = info.default if info.default != "" else "''"
        extra: dict[str, Any] = {"nargs": "?", "const": "true"} if takes_bare_flag(info.type) else {}
        group.add_argument(
            f"--{info.name}",
            dest=info.name,
            metavar=type_label(info.type),
            default=argparse.SUPPRESS,  # only what the user typed counts as an override
            help=f"{info.doc} (default: {default})".replace("%", "%%"),
            **extra,
        )


def parse_run_config(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[RunConfig, argparse.Namespace]:
    """Parse argv with `parser` and compose defaults <- --config preset <- the options typed."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        bad = unknown[0]
        if bad.startswith("--"):
            name = bad[2:].split("=", 1)[0]
            raise ConfigError(f"unknown option --{name}{suggest(name, list(field_table()))}")
        raise ConfigError(f"unexpected argument {bad!r}: options are written --name=value or --name value")
    overrides = {name: value for name, value in vars(args).items() if name in field_table()}
    return build_config(getattr(args, "config", None), overrides), args
