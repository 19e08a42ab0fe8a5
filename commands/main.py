"""Parse the command line, run the command, turn what it raised into one line and an exit code.

    lowmem-train COMMAND [options]          (or: python train_low_mem.py COMMAND [options])

A command module has HELP (one line), add_arguments(parser) and run(args, cfg) -> exit code, and imports
nothing heavy at module level, so that --help stays fast. USES_RUN_CONFIG = True modules get every option of
the config tree and a resolved RunConfig.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

from lowmem_train.config.cli import OneLineParser, add_run_config_options, parse_run_config
from lowmem_train.config.errors import ConfigError

COMMANDS = {name: f"lowmem_train.commands.{name}" for name in
            ("train", "prepare", "estimate", "report", "export", "generate")}
DESCRIPTION = ("lowmem-train: train T5 / GPT models without running out of memory and without losing progress. "
               "`COMMAND --help` lists a command's options.")

# Exit codes (README, "Exit codes").
EXIT_USER_ERROR = 2


def available_commands() -> dict[str, object]:
    return {name: importlib.import_module(module) for name, module in COMMANDS.items()}


def build_parser(commands: dict[str, object] | None = None) -> OneLineParser:
    commands = available_commands() if commands is None else commands
    parser = OneLineParser(prog="lowmem-train", description=DESCRIPTION, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, module in commands.items():
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP, allow_abbrev=False)
        if getattr(module, "USES_RUN_CONFIG", False):
            add_run_config_options(cmd)
        module.add_arguments(cmd)
    return parser


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def say_error(message: str, every_rank: bool = False) -> None:
    """The one way a failure reads: a single line on stderr. Rank 0 only, where every rank fails alike;
    `every_rank` where one rank alone knows (it may be the only one left)."""
    if every_rank or is_main_process():
        prefix = "" if is_main_process() else f"[rank {os.environ.get('RANK')}] "
        print(f"{prefix}error: {message}", file=sys.stderr, flush=True)


def dispatch(argv: list[str]) -> int:
    commands = available_commands()
    parser = build_parser(commands)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else EXIT_USER_ERROR
    if argv[0] not in commands:
        raise ConfigError(f"unknown command {argv[0]!r}; commands: {', '.join(commands)}")
    module = commands[argv[0]]
    if getattr(module, "USES_RUN_CONFIG", False):
        cfg, args = parse_run_config(parser, argv)
    else:
        cfg, args = None, parser.parse_args(argv)
    from lowmem_train.trainer.run_log import setup_logging

    setup_logging(is_main=is_main_process())
    return module.run(args, cfg)


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user mistake becomes one line and exit code 2, never a traceback."""
    # Nothing is ever fetched from a hub: models, tokenizers and data come from local folders. Set before
    # huggingface_hub is imported (it reads the variable once), so that a path that is not a folder fails at
    # once instead of after half a minute of network retries.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return dispatch(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:  # user mistakes (config, data, launch)
        if not is_main_process():
            # A launcher stops every rank as soon as one fails: let rank 0 say it first (when it fails alike, the
            # launcher ends this rank before it repeats the line), yet never lose a mistake only this rank saw.
            time.sleep(3)
        say_error(str(exc), every_rank=True)
        return EXIT_USER_ERROR


def console_main() -> None:
    """The `lowmem-train` console command."""
    sys.exit(main())
