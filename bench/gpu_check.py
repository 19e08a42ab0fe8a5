"""GPU acceptance check for lowmem-train: five checks on the real device, one table, exit 1 if an expectation fails.

    python bench/gpu_check.py                      # every check the GPUs here allow; meant to take < 8 minutes
    python bench/gpu_check.py --dry-run            # what it would run, on any machine
    python bench/gpu_check.py --only speed,oom --keep

Written for the day a machine with NVIDIA GPUs is at hand: it has never run on one (this project has no GPU), so
its bounds are reasoned from the CPU measurements and the product's own constants, never from a GPU number.
Every check runs the real commands (`train_low_mem.py train` / `estimate`, `accelerate launch`) in subprocesses in
WORK and reads what they write (metrics.jsonl, memory.jsonl, the log); nothing is downloaded: the bundled task and
its tokenizer are made in WORK by the code `train` runs for them. No LOWMEM_FAULT_* seam is set in any run.
Without a GPU it says so in one line and exits 2; --dry-run prints each check, its command lines and its
expectation, and exits 0. Placeholders in a dry run: <L> the task's longest tokenized row (every run's
--max_seq_len: the estimate's worst case is then one the data reaches; nothing is truncated), <P> bf16 on compute
capability >= 8.0 else no (fp32), <M> and <S> the out-of-memory check's micro-batch and steps, <PORT> a free port.

Checks (--dry-run adds their command lines and why each bound is what it is):
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for bench.*
from bench.gpu_check_children import MARK, read_jsonl
from bench.gpu_check_expect import (BY_NAME, CHECKS, TIME_LIMIT, Row, exit_code, judge_estimate, judge_oom,
                                     judge_other_process, judge_speed, judge_zero2, oom_micro, render)

REPO = Path(__file__).resolve().parent.parent
ENTRY, CHILD = REPO / "train_low_mem.py", REPO / "bench" / "gpu_check_children.py"
MULTI_GPU = REPO / "accelerate_configs" / "multi_gpu_zero2_offload.yaml"
SPEED_BATCH = 32  # t5_small's global batch (16 x 2), one micro-batch on both sides: the same arithmetic
BIG_BATCH = 512  # estimate and other_process: activations a large share of the GPU memory, not only model states
EPOCH_STEPS, PROBE_EVERY = 30, 2  # other_process: 3 short epochs, sampled often enough to see the helper early
_BIN = Path(sys.executable).parent / "accelerate"  # the launcher of this environment, as a user types it
ACCELERATE = [str(_BIN), "launch"] if _BIN.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]


@dataclass
class Ctx:
    work: Path
    devices: list[str]  # CUDA_VISIBLE_DEVICES entries, in CUDA's order
    precision: str  # --mixed_precision of the 1-GPU runs: bf16 or no
    longest: str  # --max_seq_len of every run
    warmup: int
    steps: int
    timeout: float


# ---- the command lines ---------------------------------------------------------------------------------------
def train(ctx: Ctx, out: str, *options: str) -> list[str]:
    return [sys.executable, str(ENTRY), "train", "--config", "t5_small", "--validation_file=", f"--output_dir={out}",
            f"--max_seq_len={ctx.longest}", *options]


def one_gpu(ctx: Ctx, micro) -> list[str]:
    return ["--deepspeed_config=none", f"--mixed_precision={ctx.precision}", f"--batch_size_per_gpu={micro}",
            "--gradient_accumulation_steps=1"]


def child(ctx: Ctx, name: str, *options: str) -> list[str]:
    return [sys.executable, str(CHILD), name, *options]


def commands(name: str, ctx: Ctx, micro="<M>", steps="<S>", port="<PORT>") -> list[list[str]]:
    fixed = ["--logging_steps=1", "--save_steps=1000000"]  # a metrics line per step; no checkpoint until the end
    if name == "speed":
        return [train(ctx, "runs/speed", *one_gpu(ctx, SPEED_BATCH), f"--max_steps={ctx.warmup + ctx.steps}", *fixed),
                child(ctx, "torch", f"--max_seq_len={ctx.longest}", f"--batch={SPEED_BATCH}",
                      f"--precision={ctx.precision}", f"--warmup={ctx.warmup}", f"--steps={ctx.steps}")]
    if name == "zero2":
        return [[*ACCELERATE, "--config_file", str(MULTI_GPU), "--num_processes", "2", "--main_process_port", str(port),
                 *train(ctx, "runs/zero2", "--max_steps=20", *fixed)[1:]]]
    if name == "oom":
        return [child(ctx, "probe", f"--max_seq_len={ctx.longest}", f"--precision={ctx.precision}"),
                train(ctx, "runs/oom", *one_gpu(ctx, micro), f"--max_steps={steps}", "--force", *fixed)]
    if name == "estimate":
        big = one_gpu(ctx, BIG_BATCH)
        return [[sys.executable, str(ENTRY), "estimate", "--config", "t5_small", f"--max_seq_len={ctx.longest}",
                 *big, "--num_processes=1"],
                train(ctx, "runs/estimate", *big, "--max_steps=20", "--memory.probe_every=5", *fixed)]
    return [child(ctx, "hog", "--journal=runs/other_process/memory.jsonl", "--stop_file=hog.stop"),
            train(ctx, "runs/other_process", *one_gpu(ctx, BIG_BATCH), "--train_file=data/small/train.parquet",
                  "--epochs=3", f"--memory.probe_every={PROBE_EVERY}", *fixed)]


# ---- running them ----------------------------------------------------------------------------------------------
@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def gpu_env(ctx: Ctx, gpus: int, drop: tuple[str, ...] = ()) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOWMEM_FAULT_") and k not in drop}
    return {**env, "CUDA_VISIBLE_DEVICES": ",".join(ctx.devices[:gpus]), "PYTHONWARNINGS": "ignore",
            "TOKENIZERS_PARALLELISM": "false"}


def start(ctx: Ctx, tag: str, cmd: list[str], gpus: int = 1, drop: tuple[str, ...] = ()) -> subprocess.Popen:
    """In its own session, so that a timeout ends the launcher, its ranks and their workers together; output in
    WORK/logs/TAG.out and .err."""
    logs = ctx.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{tag}.out", "w") as out, open(logs / f"{tag}.err", "w") as err:
        return subprocess.Popen(cmd, cwd=ctx.work, env=gpu_env(ctx, gpus, drop), stdout=out, stderr=err,
                                start_new_session=True)


def finish(ctx: Ctx, tag: str, proc: subprocess.Popen, timeout: float) -> Done:
    try:
        returncode = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        returncode = -9
    logs = ctx.work / "logs"
    return Done(returncode, (logs / f"{tag}.out").read_text(), (logs / f"{tag}.err").read_text())


def run(ctx: Ctx, tag: str, cmd: list[str], gpus: int = 1, drop: tuple[str, ...] = ()) -> Done:
    return finish(ctx, tag, start(ctx, tag, cmd, gpus, drop), ctx.timeout)


def marks(text: str) -> list:
    return [json.loads(line[len(MARK):]) for line in text.splitlines() if line.startswith(MARK)]


def ran(done: Done, what: str) -> Done:
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{what} exited {done.returncode}: {tail[0][:200]}")
    return done


def check_speed(ctx: Ctx) -> Row:
    from bench.peers import lowmem_result

    lowmem_cmd, bare_cmd = commands("speed", ctx)
    ran(run(ctx, "speed_lowmem", lowmem_cmd), "lowmem-train")
    mine = lowmem_result(ctx.work / "runs/speed", ctx.warmup, ctx.steps, 1, SPEED_BATCH)
    bare = marks(ran(run(ctx, "speed_torch", bare_cmd), "the bare torch loop").stdout)[-1]
    return judge_speed(mine["samples"] / mine["seconds"], bare["samples"] / bare["seconds"])


def check_zero2(ctx: Ctx) -> Row:
    from bench.peers import free_port
    from lowmem_train.trainer.threads import usable_cores

    done = run(ctx, "zero2", commands("zero2", ctx, port=free_port())[0], gpus=2,
               drop=("OMP_NUM_THREADS", "MKL_NUM_THREADS"))
    first = next((line for line in done.stderr.splitlines() if "CPU threads per rank" in line), None)
    return judge_zero2(first, done.returncode, usable_cores()[0])


def check_oom(ctx: Ctx) -> Row:
    probe = marks(ran(run(ctx, "oom_probe", commands("oom", ctx)[0]), "the probe").stdout)[-1]
    micro = oom_micro(probe)
    if micro is None:
        fit = probe["fits"][-1] if probe["fits"] else [0, 0]
        return Row("oom", f"no micro-batch to provoke it: the probe's forwards ran out of memory at "
                          f"{probe['oom_at']} rows (largest that fit: {fit[0]} rows, {fit[1] / 2**30:.2f} GB), "
                          f"the task has {probe['rows']:,}", BY_NAME["oom"].expect, False)
    done = run(ctx, "oom", commands("oom", ctx, micro, 2 if 2 * micro <= probe["rows"] else 1)[1])
    return judge_oom(read_jsonl(ctx.work / "runs/oom/memory.jsonl"), done.returncode, micro)


def check_estimate(ctx: Ctx) -> Row:
    estimate_cmd, train_cmd = commands("estimate", ctx)
    said = ran(run(ctx, "estimate_cmd", estimate_cmd), "estimate").stdout
    m = re.search(r"GPU memory\s+([\d.]+) (GB|MB) per GPU", said)
    figure = None if m is None else float(m[1]) / (1024 if m[2] == "MB" else 1)
    done = run(ctx, "estimate_run", train_cmd)
    samples = [r for r in read_jsonl(ctx.work / "runs/estimate/memory.jsonl") if r.get("kind") == "sample"]
    return judge_estimate(figure, samples, done.returncode)


def check_other_process(ctx: Ctx) -> Row:
    hog_cmd, train_cmd = commands("other_process", ctx)
    stop = ctx.work / "hog.stop"
    stop.unlink(missing_ok=True)
    hog = start(ctx, "hog", hog_cmd)
    deadline = time.time() + 120
    while not marks((ctx.work / "logs/hog.out").read_text()) and hog.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # its CUDA context first, so that its start is not inside the run
    done = run(ctx, "other_process", train_cmd)
    stop.touch()
    finish(ctx, "hog", hog, 60)
    helper = next((r for r in marks((ctx.work / "logs/hog.out").read_text()) if "held_gb" in r), None)
    return judge_other_process(read_jsonl(ctx.work / "runs/other_process/memory.jsonl"), done.returncode, helper,
                               BIG_BATCH)


RUNNERS = {"speed": check_speed, "zero2": check_zero2, "oom": check_oom, "estimate": check_estimate,
           "other_process": check_other_process}


# ---- main ----------------------------------------------------------------------------------------------------
def show(cmd: list[str], gpus: int) -> str:
    text = shlex.join(cmd).replace(str(_BIN), "accelerate").replace(sys.executable, "python")
    text = text.replace(str(REPO), "$REPO")
    background = " &    # in the background, started first" if "hog" in cmd else ""
    return (f"CUDA_VISIBLE_DEVICES={','.join(map(str, range(gpus)))} " if gpus else "") + text + background


def setup_cmd(ctx: Ctx) -> list[str]:
    return child(ctx, "setup", f"--small_rows={EPOCH_STEPS * BIG_BATCH}")


def dry_run(names: list[str], args) -> None:
    ctx = Ctx(Path("WORK"), [], "<P>", "<L>", args.warmup, args.steps, args.timeout)
    print(f"gpu_check --dry-run: nothing runs. Every command runs in WORK (--work_dir, default a temporary folder); "
          f"$REPO = {REPO}.")
    print(f"setup: $ {show(child(ctx, 'gpus'), 0)}\n       $ {show(setup_cmd(ctx), 0)}")
    for i, name in enumerate(names, 1):
        c = BY_NAME[name]
        print(f"\n[{i}] {name} ({c.gpus} GPU{'s' if c.gpus > 1 else ''}): {c.title}")
        for cmd in commands(name, ctx):
            print(f"    $ {show(cmd, c.gpus)}")
        print(f"    expect: {c.expect}\n    why: {c.why}")
    print(f"\nthen one table (check, measured, expectation, result) and a total time (expect < {TIME_LIMIT / 60:.0f} "
          "min); exit 1 if any expectation fails, 2 without a GPU.")


def detect_gpus() -> tuple[list[dict], list[str], str]:
    """(devices torch sees, their CUDA_VISIBLE_DEVICES entries, what went wrong asking), from a child process."""
    done = subprocess.run([sys.executable, str(CHILD), "gpus"], capture_output=True, text=True, timeout=120)
    found = marks(done.stdout)
    devices = found[-1] if found else []
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    said = (done.stderr.strip().splitlines() or ["no output"])[-1][:150]
    problem = "" if found else f" (asking torch failed: {said})"
    return devices, (visible or [str(i) for i in range(len(devices))])[:len(devices)], problem


def main(argv: list[str] | None = None) -> int:
    checks = "".join(f"  {c.name} ({c.gpus} GPU{'s' if c.gpus > 1 else ''}): {c.title}. Expect {c.expect}.\n"
                     for c in CHECKS)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1] + checks,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print each check, its commands and expectation; exit 0")
    ap.add_argument("--only", default="", metavar="CHECKS",
                    help=f"comma-separated checks or their numbers: {', '.join(BY_NAME)}")
    ap.add_argument("--work_dir", type=Path, metavar="DIR",
                    help="data (made once, reused), runs/ and logs/ (replaced at each start); default: a new temporary "
                         "folder, removed at the end unless --keep or a check failed")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    ap.add_argument("--steps", type=int, default=200, help="timed steps of the speed check (after --warmup)")
    ap.add_argument("--warmup", type=int, default=20, help="speed check: steps before the clock starts")
    ap.add_argument("--timeout", type=float, default=420, help="seconds before one command is stopped")
    args = ap.parse_args(argv)
    picked = [s.strip() for s in args.only.split(",") if s.strip()]
    picked = [CHECKS[int(s) - 1].name if s.isdigit() and 0 < int(s) <= len(CHECKS) else s for s in picked]
    if set(picked) - set(BY_NAME):
        ap.error(f"unknown check(s) {', '.join(sorted(set(picked) - set(BY_NAME)))}; choose from {', '.join(BY_NAME)}")
    names = [n for n in BY_NAME if not picked or n in picked]
    if args.dry_run:
        dry_run(names, args)
        return 0
    started = time.time()
    devices, visible, problem = detect_gpus()
    if not devices:
        print(f"gpu_check: no NVIDIA GPU visible to torch on this machine{problem}; nothing was run (--dry-run shows "
              "what would)")
        return 2
    work = args.work_dir.resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    for ours in ("runs", "logs"):  # a run folder that holds a run is refused by `train`: each check starts afresh
        shutil.rmtree(work / ours, ignore_errors=True)
    ctx = Ctx(work, visible, "bf16" if tuple(devices[0]["cc"]) >= (8, 0) else "no", "", args.warmup, args.steps,
              args.timeout)
    try:
        ctx.longest = str(marks(ran(run(ctx, "setup", setup_cmd(ctx)), "the data setup").stdout)[-1]["longest"])
    except (RuntimeError, IndexError) as exc:
        print(f"gpu_check: {exc}; see {work}/logs/setup.err")
        return 1
    gpus = "; ".join(f"{d['name']} ({d['total_gb']:.1f} GB, compute capability {d['cc'][0]}.{d['cc'][1]})"
                     for d in devices)
    print(f"GPUs: {gpus}; 1-GPU runs on CUDA_VISIBLE_DEVICES={visible[0]}, precision {ctx.precision}; the task's "
          f"longest row {ctx.longest} tokens (--max_seq_len); work folder {work}", flush=True)
    rows = []
    for name in names:
        c, t0 = BY_NAME[name], time.time()
        if c.gpus > len(devices):
            rows.append(Row(name, f"{len(devices)} GPU here, {c.gpus} needed", c.expect, None))
            continue
        print(f"running {name} ...", flush=True)
        try:
            row = RUNNERS[name](ctx)
        except Exception as exc:  # noqa: BLE001 - one check's failure is a row of the table, the others still run
            row = Row(name, f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", c.expect, False)
        row.measured += f" ({time.time() - t0:.0f} s)"
        rows.append(row)
    total = time.time() - started
    rows.append(Row("time", f"{total / 60:.1f} min in all", f"< {TIME_LIMIT / 60:.0f} min", total < TIME_LIMIT))
    print("\n" + render(rows))
    code = exit_code(rows)
    if args.work_dir is None and not args.keep and code == 0:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs and run folders: {work}/logs, {work}/runs")
    return code


if __name__ == "__main__":
    sys.exit(main())
