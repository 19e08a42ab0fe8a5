"""What the memory guard costs: step time with the guard sampling vs not sampling, in one training run.

    python bench/monitor_overhead.py [--probe_every 10] [--block 20] [--repeats 8] [--config t5_tiny] [--key=value ...]

One real Trainer (setup as `train` does it) runs blocks of `--block` optimizer steps, alternating
    on   guard.after_step at --probe_every: probe.sample + all-gather + memory.jsonl + TensorBoard + emergency check
    off  the same call with probing pushed out of reach (probe_every = 10**9): one modulo per step
so that drift (other jobs on the machine, allocator warm-up, the learning-rate schedule) hits both alike. The
config has no "probe off" value (probe_every >= 1, adaptive=false still samples), hence the huge interval.
Under a noisy machine the end-to-end difference is dominated by noise, so the cost of one guard call is also
timed alone, back to back, and turned into an overhead: call cost / probe_every / step time.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

OFF = 10**9


def main(argv: list[str]) -> int:
    from lowmem_train.config.cli import OneLineParser, add_run_config_options, parse_run_config

    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe_every", type=int, default=None, help="interval to measure (default: the config's)")
    parser.add_argument("--block", type=int, default=20, help="steps per block")
    parser.add_argument("--repeats", type=int, default=8, help="blocks per mode, alternating")
    parser.add_argument("--warmup", type=int, default=10, help="steps before timing starts")
    parser.add_argument("--calls", type=int, default=200, help="guard calls timed back to back")
    add_run_config_options(parser)
    with tempfile.TemporaryDirectory() as out:
        defaults = ["--validation_file=", f"--output_dir={out}", "--save_steps=1000000", "--logging_steps=1000000"]
        cfg, args = parse_run_config(parser, defaults + argv)
        every = args.probe_every or cfg.memory.probe_every
        return bench(cfg, every, args.block, args.repeats, args.warmup, args.calls)


def bench(cfg, every: int, block: int, repeats: int, warmup: int, calls: int) -> int:
    import logging

    from lowmem_train.trainer.run_log import setup_logging
    from lowmem_train.trainer.trainer import Trainer

    setup_logging(is_main=True)
    logging.getLogger("lowmem_train").setLevel(logging.WARNING)
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.run_log.start_epoch(0, cfg.epochs, trainer.dataset.steps_per_epoch(), 0)
    trainer.run_log.bar.disable = True  # the progress bar's redraws are not what we measure
    times: dict[str, list[float]] = {"on": [], "off": []}
    batches = iter(trainer.epoch_batches())
    schedule = ["warmup"] * warmup + [mode for _ in range(repeats) for mode in ("on", "off") for _ in range(block)]
    for mode in schedule:
        trainer.cfg.memory.probe_every = every if mode != "off" else OFF
        t0 = time.perf_counter()
        trainer.one_step(next(batches))
        if mode != "warmup":
            times[mode].append(time.perf_counter() - t0)

    # The guard call alone, as after_step makes it at a sampling step. The probe re-reads PSS (the costly part)
    # only every pss_refresh_seconds, so the slowest call shows that cost and the mean its amortised share.
    trainer.cfg.memory.probe_every = 1
    trainer.guard.probe._pss_read_at = -float("inf")  # the first call pays a full PSS read
    call_times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        trainer.guard.after_step(trainer.state.step, trainer.run_log)
        call_times.append(time.perf_counter() - t0)
    call = statistics.fmean(call_times)
    trainer.run_log.close()

    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    mean_on, mean_off = statistics.fmean(times["on"]), statistics.fmean(times["off"])
    b = trainer.backend
    print(f"\n{cfg.model.type} d_model {cfg.model.d_model}, micro-batch {trainer.guard.plan.micro_batch}, "
          f"{b.world_size} process(es), {repeats} x {block} steps per mode, alternating; probe_every {every}")
    print("| guard | median step (ms) | mean step (ms) | steps |")
    print("|---|---|---|---|")
    print(f"| on (probe_every {every}) | {on * 1e3:.2f} | {mean_on * 1e3:.2f} | {len(times['on'])} |")
    print(f"| off | {off * 1e3:.2f} | {mean_off * 1e3:.2f} | {len(times['off'])} |")
    print(f"| on / off | {on / off:.4f} | {mean_on / mean_off:.4f} | |")
    print(f"one guard call (sample + gather + journal + TensorBoard): mean {call * 1e3:.3f} ms, median "
          f"{statistics.median(call_times) * 1e3:.3f} ms, slowest {max(call_times) * 1e3:.2f} ms (a full PSS read); "
          f"at probe_every {every} the mean is {call / every / off:.3%} of a {off * 1e3:.1f} ms step (target < 1%)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
