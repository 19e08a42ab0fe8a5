"""lowmem-train: train T5 / GPT models without running out of memory and without losing progress.

    python train_low_mem.py train [--config t5_tiny] [--key=value ...]
    accelerate launch --config_file accelerate_configs/multi_gpu_zero2_offload.yaml train_low_mem.py train
    python train_low_mem.py COMMAND --help

Parse the command line, build the config, hand it to the command. Nothing else lives here.
"""

from __future__ import annotations

import importlib
import os
import sys

from lowmem_train.config.cli import OneLineParser, add_run_config_options, fail, parse_run_config
from lowmem_train.config.schema import ConfigError

# command -> module. Each module has HELP (one line), add_arguments(parser) and run(args, cfg) -> exit code,
# and imports nothing heavy at module level (so that --help stays fast). USES_RUN_CONFIG = True modules get
# every option of the config tree and a resolved RunConfig.
COMMANDS = {
    "train": "lowmem_train.trainer.train_command",
    "prepare": "lowmem_train.trainer.data.prepare",
    "estimate": "lowmem_train.trainer.memory.estimate",
    "report": "lowmem_train.trainer.memory.report",
    "export": "lowmem_train.trainer.export",
    "generate": "lowmem_train.model.generate",
}


def available_commands() -> dict[str, object]:
    found = {}
    for name, module in COMMANDS.items():
        try:
            found[name] = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # the module exists but something it imports is missing: a real error
                raise
    return found


def build_parser(commands: dict[str, object] | None = None) -> OneLineParser:
    commands = available_commands() if commands is None else commands
    parser = OneLineParser(prog="train_low_mem.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, module in commands.items():
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP, allow_abbrev=False)
        if getattr(module, "USES_RUN_CONFIG", False):
            add_run_config_options(cmd)
        module.add_arguments(cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = available_commands()
    parser = build_parser(commands)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] not in commands:
        raise ConfigError(f"unknown command {argv[0]!r}; commands: {', '.join(commands)}")
    module = commands[argv[0]]
    if getattr(module, "USES_RUN_CONFIG", False):
        cfg, args = parse_run_config(parser, argv)
    else:
        cfg, args = None, parser.parse_args(argv)
    from lowmem_train.trainer.run_log import setup_logging

    setup_logging(is_main=os.environ.get("RANK", "0") == "0")
    return module.run(args, cfg)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as exc:  # user mistakes (config, data, launch): one line, no traceback
        if os.environ.get("RANK", "0") == "0":
            fail(str(exc))
        sys.exit(2)
