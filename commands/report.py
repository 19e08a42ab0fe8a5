"""`report`: a run's memory over its steps as a PNG, and a printed summary."""

from __future__ import annotations

HELP = "plot a run's memory over its steps (PNG) and print peaks, plan changes and the last snapshot"


def add_arguments(parser) -> None:
    parser.add_argument("--run_dir", required=True, help="the run's output_dir (holds memory.jsonl)")
    parser.add_argument("--output", default=None, help="PNG path (default: RUN_DIR/memory_report.png)")


def run(args, cfg=None) -> int:
    from pathlib import Path

    from lowmem_train.trainer.memory.report import draw, load_run, summary

    run_dir = Path(args.run_dir)
    data = load_run(run_dir)
    output = Path(args.output) if args.output else run_dir / "memory_report.png"
    draw(data, f"memory of {run_dir}", output)
    print(summary(data))
    print(f"plot: {output}")
    return 0
