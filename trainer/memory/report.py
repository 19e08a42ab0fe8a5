"""A run's memory over its steps as a PNG, and a summary (what the `report` command shows).

Reads run_dir/memory.jsonl, which the memory guard appends to (rank 0):
    {"kind": "sample", "step", "host_available_gb", "job_available_gb", "swap_used_gb", "tree_pss_gb",
     ["gpu_used_gb", "gpu_used_fraction", "torch_peak_gb"], "sample": MemorySample.to_vector(), "plan"}
    {"kind": "plan", "step", "when", "reason", "plan"}          every plan change
    {"kind": "snapshot", "step", "host": {...}, "gpu": {...}, "tips"}  at epoch ends (snapshot.py)
and run_dir/metrics.jsonl's "train" lines for throughput and the micro-batch in force. Panels share the step
axis; plan changes are dashed vertical lines on every panel with a short label on the top one.
"""

from __future__ import annotations

import json
from pathlib import Path

from lowmem_train.config.errors import ConfigError


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (a run killed mid-write) is skipped, not fatal."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def load_run(run_dir: Path) -> dict[str, list[dict]]:
    if not run_dir.is_dir():
        raise ConfigError(f"--run_dir {run_dir} does not exist (give the output_dir of a run)")
    journal = run_dir / "memory.jsonl"
    if not journal.is_file():
        raise ConfigError(f"{journal} not found: this run wrote no memory samples (the memory guard writes them "
                          "every --memory.probe_every steps, on rank 0)")
    records = read_jsonl(journal)
    kinds = {k: [r for r in records if r.get("kind") == k] for k in ("sample", "plan", "snapshot")}
    if not kinds["sample"]:
        raise ConfigError(f"{journal} holds no memory samples yet: train at least --memory.probe_every steps")
    metrics = run_dir / "metrics.jsonl"
    kinds["train"] = [r for r in read_jsonl(metrics) if r.get("kind") == "train"] if metrics.is_file() else []
    return kinds


def short_label(reason: str, limit: int = 34) -> str:
    """The action of a plan reason ("job available 1.2 GB < 2.0 GB: workers 2 -> 1" -> "workers 2 -> 1")."""
    action = reason.split("; ")[0].rsplit(": ", 1)[-1].split(", grad_accum")[0]  # accumulation follows the micro-batch
    if action == "undone":  # "micro-batch 16 -> 8, grad_accum 2 -> 4 saved 10 MB of peak < 28 MB: undone"
        action = "undid " + reason.split(" saved ")[0].split(", grad_accum")[0]
    return action if len(action) <= limit else action[: limit - 1] + "…"


def label_groups(plans: list[dict], span: int, width: float = 0.06) -> list[tuple[int, int, str]]:
    """One label per cluster of plan changes closer than `width` of the step axis: (first step, last step, text).
    A change every step (an emergency under a tight budget) would otherwise print dozens of labels on each other:
    a cluster reads "7 changes, steps 3-12: ... -> <the last one>"."""
    groups: list[list[dict]] = []
    for plan in plans:
        if groups and plan["step"] - groups[-1][-1]["step"] <= width * max(span, 1):
            groups[-1].append(plan)
        else:
            groups.append([plan])
    out = []
    for group in groups:
        first, last = group[0]["step"], group[-1]["step"]
        text = short_label(group[-1].get("reason", ""), limit=26)
        if len(group) > 1:
            text = f"{len(group)} changes, steps {first}-{last}: ... {text}"
        out.append((first, last, text))
    return out


def series(samples: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(s["step"], s[key]) for s in samples if s.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def job_limits(samples: list[dict]) -> tuple[list[int], list[float]]:
    """The job's memory limit per sample (host total, or the tightest cgroup / Slurm / budget), from the vectors."""
    from lowmem_train.trainer.memory.units import GB, VECTOR_LENGTH, MemorySample

    points = []
    for s in samples:
        vector = s.get("sample")
        if isinstance(vector, list) and len(vector) == VECTOR_LENGTH:
            limit = MemorySample.from_vector([float("nan") if v is None else v for v in vector]).job_limit
            if limit:
                points.append((s["step"], limit / GB))
    return [p[0] for p in points], [p[1] for p in points]


def draw(run: dict[str, list[dict]], title: str, output: Path) -> None:
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache notice is not our log

    matplotlib.use("Agg")  # no display; must come before pyplot is imported
    import matplotlib.pyplot as plt

    samples, plans, train = run["sample"], run["plan"], run["train"]
    has_gpu = any(s.get("gpu_used_gb") is not None for s in samples)
    panels = ["available", "used"] + (["gpu"] if has_gpu else []) + (["speed"] if train else [])
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(11, 2.6 * len(panels) + 0.8), squeeze=False)
    axes = dict(zip(panels, axes[:, 0]))

    style = {"marker": "o", "markersize": 3} if len(samples) < 40 else {}
    ax = axes["available"]
    limit_steps, limits = job_limits(samples)
    if limits:
        ax.plot(limit_steps, limits, color="black", linestyle=":", linewidth=1, label="job limit (host total or tightest)")
    ax.plot(*series(samples, "host_available_gb"), color="tab:blue", label="host available", **style)
    steps, job = series(samples, "job_available_gb")
    _, host = series(samples, "host_available_gb")
    if any(abs(j - h) > 0.05 for j, h in zip(job, host)):  # a cgroup / Slurm / budget limit binds: show it
        ax.plot(steps, job, color="tab:red", linestyle="--", label="job available (tightest limit)")
    ax.set_ylabel("available (GB)")

    ax = axes["used"]
    ax.plot(*series(samples, "tree_pss_gb"), color="tab:green", label="this run's tree PSS (ranks' worst)", **style)
    if any(s.get("swap_used_gb", 0) > 0 for s in samples):
        ax.plot(*series(samples, "swap_used_gb"), color="tab:purple", label="swap used (host)")
    ax.set_ylabel("used (GB)")

    if has_gpu:
        ax = axes["gpu"]
        ax.plot(*series(samples, "gpu_used_gb"), color="tab:orange", label="GPU used (fullest device, NVML)")
        if any(s.get("torch_peak_gb") is not None for s in samples):
            ax.plot(*series(samples, "torch_peak_gb"), color="tab:brown", linestyle=":", label="torch peak allocated")
        ax.set_ylabel("GPU (GB)")

    if train:
        ax = axes["speed"]
        ax.plot(*series(train, "samples_per_s"), color="tab:gray", label="samples/s",
                **({"marker": "o", "markersize": 3} if len(train) < 40 else {}))
        ax.set_ylabel("samples/s")
        twin = ax.twinx()
        twin.step(*series(train, "micro_batch"), where="post", color="tab:cyan", label="micro-batch")
        twin.set_ylabel("micro-batch")
        twin.set_ylim(0, max(series(train, "micro_batch")[1] or [1]) * 1.3)
        twin.legend(loc="lower right", fontsize=8)

    top = axes["available"]
    for plan in plans:
        for a in axes.values():
            a.axvline(plan["step"], color="black", linestyle="--", linewidth=0.8, alpha=0.6)
    steps = [s["step"] for s in samples] + [p["step"] for p in plans]
    for i, (first, last, text) in enumerate(label_groups(plans, max(steps) - min(steps))):
        # Above the top panel, out of the data's way; three rows so that labels of nearby groups do not collide.
        top.annotate(text, xy=((first + last) / 2, 1.0), xycoords=("data", "axes fraction"),
                     xytext=(0, 4 + 11 * (i % 3)), textcoords="offset points", fontsize=8, ha="center", va="bottom",
                     arrowprops={"arrowstyle": "-", "color": "gray", "linewidth": 0.6})
    for a in axes.values():
        a.set_ylim(0, a.get_ylim()[1] * 1.12)  # room above the highest line for the legend and labels
        a.grid(True, alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(loc="best", fontsize=8)
    axes[panels[-1]].set_xlabel("optimizer step")
    fig.suptitle(title + (f" - {len(plans)} plan change(s), dashed" if plans else " - no plan change"), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97 if plans else 1))
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)


def summary(run: dict[str, list[dict]]) -> str:
    samples, plans, snaps = run["sample"], run["plan"], run["snapshot"]

    def extreme(key: str, pick) -> str:
        found = [s for s in samples if s.get(key) is not None]
        if not found:
            return "-"
        best = pick(found, key=lambda s: s[key])
        return f"{best[key]:.2f} GB at step {best['step']}"

    lines = [f"{len(samples)} samples, steps {samples[0]['step']}..{samples[-1]['step']}",
             f"peak tree PSS      {extreme('tree_pss_gb', max)}",
             f"least available    host {extreme('host_available_gb', min)}; job {extreme('job_available_gb', min)}",
             f"most swap used     {extreme('swap_used_gb', max)}"]
    if any(s.get("gpu_used_gb") is not None for s in samples):
        lines.append(f"peak GPU used      {extreme('gpu_used_gb', max)}; torch peak {extreme('torch_peak_gb', max)}")
    lines.append(f"plan changes       {len(plans) or 'none'}")
    lines += [f"  step {p['step']} ({p.get('when', '')}): {p.get('reason', '')}" for p in plans]
    if snaps:
        last = snaps[-1]
        lines.append(f"last snapshot      step {last['step']}")
        for pool in ("host", "gpu"):
            if pool in last:
                parts = ", ".join(f"{k} {v:.2f}" for k, v in last[pool]["parts_gb"].items())
                now, peak = last[pool]["current_gb"], last[pool]["peak_gb"]
                lines.append(f"  {pool}: {now:.2f} GB now ({parts}), peak {peak:.2f} GB")
        lines += [f"  tip: {tip}" for tip in last.get("tips", [])]
    return "\n".join(lines)
