"""`estimate`: host RAM and GPU memory a run needs, against what this machine has, and a starting plan."""

from __future__ import annotations

HELP = "estimate host RAM and GPU memory a run needs, compare with this machine, recommend a starting plan"
USES_RUN_CONFIG = True


def add_arguments(parser) -> None:
    parser.add_argument("--num_processes", type=int, default=None, metavar="N",
                        help="processes the run will use (default: the launched world size, else 1)")


def run(args, cfg) -> int:
    from lowmem_train.config.errors import ConfigError
    from lowmem_train.trainer.memory.estimate import machine_capacity, recommend, render
    from lowmem_train.trainer.memory.footprint import estimate

    if args.num_processes is not None and args.num_processes < 1:
        raise ConfigError(f"--num_processes must be at least 1 (got {args.num_processes})")
    est = estimate(cfg, args.num_processes)
    cap = machine_capacity(cfg)
    print(render(est, cap, recommend(cfg, est, cap), cfg))
    return 0
