"""The real train command on a simulated GPU node (tests/gpu_node.py): the probe, policy and guard read a simulated
device whose allocated memory follows the run, while the model trains on the CPU.

    [accelerate launch ...] sim_gpu_train.py SPEC.json train [train options...]

SPEC (JSON): {"gpus": [SimDevice fields...], "context": bytes, "activation_scale": k,
              "others": [{"gpu": PCI index, "bytes": n or "all_free", "from_step": a, "until_step": b}],
              "nvml": true}
("all_free": another user's job that takes whatever is free on that device when it starts, as frameworks that
preallocate do.)
Each rank computes on cuda:LOCAL_RANK of the node as CUDA enumerates it for this environment.

What the simulated device holds, from the run itself:
    model states    from the first forward on: weights + AdamW's two moments, 12 bytes per parameter
    activations     each training forward: rows x the family's activation formula for a sample at max_seq_len
                    (trainer/memory/activations.py, fp32, checkpointing as the model has it) x activation_scale,
                    freed when the next micro-batch's forward starts (its backward is done) or the step ends;
                    an evaluation forward peaks at a quarter of that (no graph: one layer and the logits at a
                    time) and frees it when it returns
    gradients       4 bytes per parameter from a step's first forward to its end
    others          other users' processes on that device, by step (the spec's schedule)
An allocation the device cannot hold raises torch.OutOfMemoryError inside the forward pass, as CUDA's allocator
would, so the step's real out-of-memory path runs. On exit, OUTPUT_DIR/sim_rank{R}.json holds what the simulated
allocator saw (out-of-memory errors, cache releases the product asked for, others' schedule steps).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root

from lowmem_train.commands.main import build_parser, main  # noqa: E402
from lowmem_train.config.cli import parse_run_config  # noqa: E402
from lowmem_train.model import families  # noqa: E402
from lowmem_train.model.build import gradient_checkpointing_active  # noqa: E402
from lowmem_train.trainer import step as step_module  # noqa: E402
from lowmem_train.trainer.memory.activations import activation_bytes_per_sample  # noqa: E402
from tests.gpu_node import CONTEXT, SimDevice, SimNode, install  # noqa: E402


class RunOnSimulatedGpu:
    def __init__(self, spec: dict, cfg):
        self.spec, self.cfg = spec, cfg
        gpus = [SimDevice(**{**g, "capability": tuple(g.get("capability", (8, 0))),
                             "mig": [SimDevice(**m) for m in g.get("mig", [])]}) for g in spec["gpus"]]
        self.node = SimNode(gpus, nvml=spec.get("nvml", True))
        self.cuda = self.node.process(device=int(os.environ.get("LOCAL_RANK", "0")),
                                      context=int(spec.get("context", CONTEXT)))
        self.base_others = [g.others for g in gpus]
        self.step, self.states, self.grads, self.activations = 0, None, None, None
        self.others_seen: list[tuple[int, int]] = []

    def follow_others(self) -> None:
        for i, gpu in enumerate(self.node.gpus):
            extra = 0
            for other in self.spec.get("others", []):
                if other["gpu"] == i and other["from_step"] <= self.step < other.get("until_step", 1 << 60):
                    if other["bytes"] == "all_free":  # fixed at what was free when it started
                        other["bytes"] = gpu.free
                    extra += other["bytes"]
            gpu.others = self.base_others[i] + extra

    def on_forward(self, model, rows: int) -> None:
        net = getattr(model, "module", model)
        params = sum(p.numel() for p in net.parameters())
        if self.states is None:
            self.states = self.cuda.allocate(12 * params)
        self.follow_others()
        if self.activations is not None:  # the previous micro-batch's backward has run
            self.cuda.free(self.activations)
            self.activations = None
        training = torch.is_grad_enabled()
        if training and self.grads is None:
            self.grads = self.cuda.allocate(4 * params)
        per_row = activation_bytes_per_sample(self.cfg, net.config.vocab_size, gradient_checkpointing_active(net),
                                              4, gpu=True) * self.spec.get("activation_scale", 1.0)
        if training:
            self.activations = self.cuda.allocate(int(rows * per_row))
        else:
            self.cuda.free(self.cuda.allocate(int(rows * per_row * 0.25)))

    def on_step_end(self) -> None:
        for name in ("activations", "grads"):
            if getattr(self, name) is not None:
                self.cuda.free(getattr(self, name))
                setattr(self, name, None)
        self.step += 1

    def wire(self) -> None:
        family = families.get(self.cfg.model.type)
        loss_sum, finish = family.token_loss_sum, step_module.finish_step

        def token_loss_sum(model, piece):
            self.on_forward(model, piece["input_ids"].shape[0])  # raises the simulated OOM inside forward()
            return loss_sum(model, piece)

        def finish_step(*args, **kwargs):
            result = finish(*args, **kwargs)
            self.on_step_end()
            return result

        family.token_loss_sum = token_loss_sum
        step_module.finish_step = finish_step
        install(self.node, self.cuda)

    def report(self, out: Path) -> None:
        rank = os.environ.get("RANK", "0")
        (out / f"sim_rank{rank}.json").write_text(json.dumps({
            "ooms": self.cuda.ooms, "cache_releases": self.cuda.cache_releases, "steps": self.step,
            "reserved": self.cuda.memory_reserved(), "device": self.cuda.visible[self.cuda.current].uuid}))


def run(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    cfg, _ = parse_run_config(build_parser(), argv[1:])
    sim = RunOnSimulatedGpu(spec, cfg)
    sim.wire()
    try:
        return main(argv[1:])
    finally:
        sim.report(Path(cfg.output_dir))


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
