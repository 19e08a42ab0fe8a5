"""lowmem-train: train T5 / GPT models without running out of memory and without losing progress.

    python train_low_mem.py train [--config t5_tiny] [--key=value ...]
    accelerate launch --config_file accelerate_configs/multi_gpu_zero2_offload.yaml train_low_mem.py train
    python train_low_mem.py COMMAND --help

Parse the command line, build the config, hand it to the command. Nothing else lives here.
"""

from __future__ import annotations

import os
import sys

from lowmem_train.config.cli import OneLineParser, add_run_config_options, fail, parse_run_config
from lowmem_train.config.schema import ConfigError

COMMANDS = {
    "train": "train a model (resume with --is_keep_training=True)",
}


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="train_low_mem.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, help_text in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        add_run_config_options(cmd)
    return parser


def run_train(argv: list[str]) -> int:
    cfg, _ = parse_run_config(build_parser(), argv)
    from lowmem_train.trainer.run_log import setup_logging
    from lowmem_train.trainer.trainer import Trainer

    setup_logging(is_main=os.environ.get("RANK", "0") == "0")
    result = Trainer(cfg).fit()
    return result.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        raise ConfigError(f"unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}")
    return {"train": run_train}[argv[0]](argv)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as exc:  # user mistakes (config, data, launch): one line, no traceback
        if os.environ.get("RANK", "0") == "0":
            fail(str(exc))
        sys.exit(2)
