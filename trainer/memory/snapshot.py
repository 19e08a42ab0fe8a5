"""A memory snapshot by part, with advice: where this rank's memory is now, where it peaked, what to change.

    parts     weights, gradients, optimizer state: the bytes of the tensors the model and optimizer hold, each
              storage counted once (ZeRO's parameters are views into flat buffers; a master copy's .grad is a
              gradient); DataLoader workers: PSS of this process's children (host only)
    total     host: PSS of this process tree (the probe's figure); GPU: torch's allocated memory on this rank's device
    rest      activations/other = total - the parts: on the host that also holds the interpreter and libraries
              (~0.3 GB, footprint.RANK_BASELINE, left out when judging it); between steps it holds no activations
    peak      host: the largest tree PSS of the samples the guard took (pass them), GPU: their largest allocator peak
              and the peak since the last of them (read without resetting it: the guard's next sample needs it);
              the peak's parts are the current ones with gradients at full size, the rest is activations/other

The optimizer is searched generically (a few levels of wrappers, their tensor attributes, the inner torch
optimizer's state and param groups) so that the plain AdamW path and DeepSpeed's ZeRO optimizers both count
without naming DeepSpeed internals that move between versions. Each rank measures its own memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from lowmem_train.trainer.compat import instance_attributes, zero3_local_shard
from lowmem_train.trainer.memory.footprint import RANK_BASELINE
from lowmem_train.trainer.memory.probe import MemoryProbe, process_pss
from lowmem_train.trainer.memory.units import GB, MemorySample

PARTS = ("weights", "gradients", "optimizer state")
REST = "activations/other"
WORKERS = "DataLoader workers"
# A part above these shares of its pool earns a tip.
OPTIMIZER_SHARE, WORKER_SHARE, REST_SHARE = 0.40, 0.15, 0.40


@dataclass
class Pool:
    """One kind of memory (host RAM or GPU) of one rank; parts (and peak_parts) sum to current (and peak)."""

    name: str
    current: int
    peak: int
    parts: dict[str, int]
    peak_parts: dict[str, int]

    def share(self, part: str) -> float:
        return self.parts.get(part, 0) / self.current if self.current else 0.0


@dataclass
class Snapshot:
    step: int
    rank: int
    pools: list[Pool]
    tips: list[str] = field(default_factory=list)

    def describe(self, tips: bool = True) -> str:
        """The report; `tips=False` when memory is plentiful (advice then is noise; memory.jsonl keeps it)."""
        lines = [f"memory snapshot at step {self.step} (rank {self.rank}):"]
        for p in self.pools:
            parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in p.parts.items())
            lines.append(f"  {p.name}: {p.current / GB:.2f} GB now ({parts}), peak {p.peak / GB:.2f} GB")
        lines += [f"  tip: {tip}" for tip in self.tips] if tips else []
        return "\n".join(lines)

    def to_record(self) -> dict:
        """The line the trainer appends to memory.jsonl."""
        gb = lambda parts: {k: round(v / GB, 4) for k, v in parts.items()}  # noqa: E731
        return {"kind": "snapshot", "step": self.step, "rank": self.rank, "tips": self.tips,
                **{p.name: {"current_gb": round(p.current / GB, 4), "peak_gb": round(p.peak / GB, 4),
                            "parts_gb": gb(p.parts), "peak_parts_gb": gb(p.peak_parts)} for p in self.pools}}


# ---- counting tensors ---------------------------------------------------------------------------------
def _tensors(obj, depth: int = 2) -> Iterator[torch.Tensor]:
    """Tensors in obj, or in its lists / tuples / dicts, `depth` containers deep."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 0 and isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth - 1)
    elif depth > 0 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth - 1)


class StorageTally:
    """Bytes per part and device; a storage already counted under an earlier part is not counted again."""

    def __init__(self):
        self.seen: set[tuple[str, int]] = set()
        self.bytes: dict[tuple[str, str], int] = {}

    def add(self, part: str, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = (t.device.type, storage.data_ptr())
            if storage.nbytes() == 0 or key in self.seen:
                continue
            self.seen.add(key)
            where = "gpu" if t.device.type == "cuda" else "host"
            self.bytes[(where, part)] = self.bytes.get((where, part), 0) + storage.nbytes()

    def get(self, where: str, part: str) -> int:
        return self.bytes.get((where, part), 0)


def _optimizer_chain(optimizer) -> list:
    """accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> the inner torch optimizer (as deep as it goes)."""
    chain, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen and len(chain) < 5:
        chain.append(optimizer)
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def tally_parts(model: torch.nn.Module, optimizer) -> StorageTally:
    tally = StorageTally()
    params = list(model.parameters())
    # ZeRO-3 leaves an empty placeholder in .data and keeps this rank's shard elsewhere.
    tally.add("weights", [zero3_local_shard(p) for p in params] + params)
    tally.add("gradients", [p.grad for p in params])
    chain = _optimizer_chain(optimizer)
    for opt in chain:  # fp32 master copies' .grad (ZeRO offload) and gradient buffers named as such
        groups = getattr(opt, "param_groups", None) or []
        tally.add("gradients", [p.grad for g in groups if isinstance(g, dict) for p in g.get("params", [])])
        attrs = instance_attributes(opt)
        tally.add("gradients", (t for name, v in attrs.items() if "grad" in name.lower() for t in _tensors(v)))
    for opt in chain:  # everything else an optimizer holds: moments, fp32 masters, step counters
        state = getattr(opt, "state", None)
        if isinstance(state, dict):
            tally.add("optimizer state", (t for s in state.values() for t in _tensors(s)))
        groups = getattr(opt, "param_groups", None) or []
        tally.add("optimizer state", [p for g in groups if isinstance(g, dict) for p in g.get("params", [])])
        attrs = instance_attributes(opt)
        tally.add("optimizer state", (t for v in attrs.values() for t in _tensors(v)))
    return tally


def _pool(name: str, total: int, peak: int, measured: dict[str, int], grad_full: int) -> Pool:
    parts = {k: v for k, v in measured.items()}
    parts[REST] = max(0, total - sum(parts.values()))
    total = max(total, sum(parts.values()))  # parts never exceed the total (a tensor's pages not yet touched)
    peak_parts = dict(measured, gradients=max(measured.get("gradients", 0), grad_full))
    peak = max(peak, sum(peak_parts.values()), total)
    peak_parts[REST] = peak - sum(peak_parts.values())
    return Pool(name, total, peak, parts, peak_parts)


def memory_snapshot(model: torch.nn.Module, optimizer, backend=None, probe: MemoryProbe | None = None,
                    samples: Sequence[MemorySample] = (), step: int = 0) -> Snapshot:
    """This rank's snapshot. `samples`: the guard's recent samples, whose largest tree PSS is the host peak."""
    if backend is not None:
        model = backend.accelerator.unwrap_model(model)
    tally = tally_parts(model, optimizer)
    # Between steps the plain path has freed its gradients (zero_grad(set_to_none)); during a step they are
    # as large as the trainable weights. ZeRO's gradient partitions stay allocated and are counted as they are.
    grad_full = {w: sum(p.numel() * p.element_size() for p in model.parameters()
                        if p.requires_grad and (p.device.type == "cuda") == (w == "gpu")) for w in ("host", "gpu")}
    probe = probe or MemoryProbe()
    now = probe.sample(step, reset_peaks=False)  # the guard's next sample still sees the peaks since its last one
    workers = max(0, now.tree_pss - process_pss()) if now.tree_processes > 1 else 0
    host_measured = {part: tally.get("host", part) for part in PARTS} | {WORKERS: workers}
    host_peak = max([now.tree_pss] + [s.tree_pss for s in samples])
    grad_host = grad_full["host"] if not tally.get("host", "gradients") else 0
    pools = [_pool("host", now.tree_pss, host_peak, host_measured, grad_host)]
    if now.gpu_total:
        gpu_measured = {part: tally.get("gpu", part) for part in PARTS}
        gpu_peak = max(p for p in [now.torch_max_allocated or 0] + [s.torch_max_allocated for s in samples] if p is not None)
        pools.append(_pool("gpu", now.torch_allocated or 0, gpu_peak, gpu_measured,
                           grad_full["gpu"] if not tally.get("gpu", "gradients") else 0))
    rank = backend.rank if backend is not None else 0
    snap = Snapshot(step, rank, pools)
    snap.tips = advise(snap, backend)
    return snap


def advise(snap: Snapshot, backend=None) -> list[str]:
    """The reference guides' "memory report with advice": name the biggest part and the option that shrinks it."""
    tips = []
    ds = getattr(backend, "ds_config", None) or {}
    zero = ds.get("zero_optimization", {})
    offloaded = zero.get("offload_optimizer", {}).get("device") == "cpu"
    world = getattr(backend, "world_size", 1)
    for pool in snap.pools:
        share = pool.share("optimizer state")
        if share > OPTIMIZER_SHARE:
            head = f"optimizer state is {share:.0%} of {pool.name} memory ({pool.parts['optimizer state'] / GB:.2f} GB)"
            if pool.name == "gpu" and not offloaded:
                tips.append(f"{head}: --deepspeed_config=zero2_offload.json moves it to host RAM")
            elif ds:
                tips.append(f"{head}: ZeRO-{zero.get('stage', 0)}{' offload' if offloaded else ''} already splits it "
                            f"{world} way(s); more processes split it further")
            else:
                tips.append(f"{head}: ZeRO-2 splits it across processes (accelerate launch --config_file "
                            "accelerate_configs/cpu_2proc_deepspeed.yaml on CPU)")
        workers = pool.parts.get(WORKERS, 0)
        if pool.share(WORKERS) > WORKER_SHARE:
            tips.append(f"DataLoader workers hold {workers / GB:.2f} GB ({pool.share(WORKERS):.0%} of {pool.name} "
                        "memory): lower --data.num_workers")
        # Activations live where the model computes; on the host, "other" also holds the interpreter and libraries.
        if pool.name != ("gpu" if len(snap.pools) > 1 else "host"):
            continue
        rest = pool.peak_parts.get(REST, 0) - (RANK_BASELINE if pool.name == "host" else 0)
        if pool.peak and rest / pool.peak > REST_SHARE:
            tips.append(f"activations/other reach {rest / GB:.2f} GB ({rest / pool.peak:.0%} of the {pool.name} peak, "
                        "libraries aside): --gradient_checkpointing=true, or a smaller --batch_size_per_gpu with a "
                        "larger --gradient_accumulation_steps")
    return tips
