"""The peers' training loops for bench/peers.py, one function per peer; each runs in its own process, started by
`python bench/peers.py --child NAME` (2 processes: under `accelerate launch`), and prints one PEERS_RESULT line.

Every loop does the arithmetic of lowmem-train's step: the model is `build_model(cfg, tokenizer)`, batches are
pre-tokenized rows collated by the trainer's `collate` (padded to the batch's longest row), the loss is
`families.get("t5").token_loss_sum(model, batch) / target tokens of the batch`, AdamW with the trainer's parameter
groups and schedule, gradient clipping at 1.0. AdamW is torch's fused kernel in every loop, as lowmem-train builds
it (trainer/optim.py) and as Seq2SeqTrainer's default `adamw_torch_fused` does: the same arithmetic, so that a ratio
measures the loops, not three AdamW implementations (on CPU the fused step is ~4x faster than the default loop for
t5_small). They are written as a user of each tool would write them: nothing here sets what lowmem-train sets for
speed (flushing denormal floats, trainer/denormals.py), unless `bench/peers.py --peers_flush_denormal` asks for it. The bare torch loop also runs on a GPU for bench/gpu_check.py
(another preset, the model and each batch on the device, bf16 autocast as Accelerate's mixed precision applies it).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DS_FILE = REPO / "ds_configs" / "zero2_offload.json"
MARK = "PEERS_RESULT "  # the line a child prints with its numbers (rank 0 only)
IGNORE_INDEX = -100
# --preset of bench/peers.py and bench/step_phases.py -> (config preset, overrides) for every loop. t5_small as the
# issue measures it: one step per batch of 32 (no accumulation), dropout 0 (the peers' arithmetic is then the same
# with any RNG), no DataLoader worker (a one-process comparison: every loop prepares its batches in its own process).
PRESETS = {
    "t5_tiny": (None, {}),
    "t5_small": ("t5_small", {"batch_size_per_gpu": "32", "gradient_accumulation_steps": "1", "model.dropout": "0",
                              "data.num_workers": "0"}),
}


def base_config(data: Path, preset: str | None = None, overrides: dict | None = None):
    """t5_tiny's RunConfig (the schema's defaults), or a preset's with `overrides`, pointed at the bench's copy of
    the bundled task."""
    from lowmem_train.config.loader import build_config

    return build_config(preset, {"train_file": str(data / "train.parquet"), "validation_file": "",
                                 "tokenizer_dir": str(data / "tokenizer"), **(overrides or {})})


def lr_at(step: int, total: int, cfg) -> float:
    """The trainer's schedule (linear warmup from lr/div_factor, cosine to lr*final_lr_ratio) over `total` steps."""
    import math

    peak, start, end = cfg.learn_rate, cfg.learn_rate / cfg.div_factor, cfg.learn_rate * cfg.final_lr_ratio
    warm = math.ceil(cfg.warmup_ratio * total)
    if step < warm:
        return start + (peak - start) * step / warm
    progress = min((step - warm) / max(total - warm, 1), 1.0)
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model, weight_decay: float) -> list[dict]:
    """The trainer's AdamW groups: no decay on biases and norms."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class Clock:
    """Wall time after each optimizer step and the target tokens of each step; steady state = steps after warmup."""

    def __init__(self, warmup: int):
        self.warmup, self.perf, self.wall, self.tokens = warmup, [], [], []

    def tick(self, tokens: int) -> None:
        self.perf.append(time.perf_counter())
        self.wall.append(time.time())
        self.tokens.append(int(tokens))

    def result(self, samples_per_step: int, total_tokens: int | None = None, **extra) -> dict:
        w, n = self.warmup, len(self.perf) - self.warmup
        seconds = self.perf[-1] - self.perf[w - 1]
        return {"steps": n, "seconds": seconds, "samples": n * samples_per_step,
                "step_s": [b - a for a, b in zip(self.perf[w - 1:], self.perf[w:])],
                "tokens": sum(self.tokens[w:]) if total_tokens is None else total_tokens,
                "window": (self.wall[w - 1], self.wall[-1]), **extra}


def child_common(data: Path, preset: str | None = None, overrides: dict | None = None):
    import torch

    if os.environ.get("PEERS_FLUSH_DENORMAL") == "1":  # --peers_flush_denormal: before torch starts its threads
        torch.set_flush_denormal(True)
    from lowmem_train.model import families
    from lowmem_train.model.build import build_model
    from lowmem_train.model.tokenizer import load_tokenizer

    cfg = base_config(data, preset, overrides)
    tokenizer = load_tokenizer(data / "tokenizer")
    model = build_model(cfg, tokenizer)
    pairs = pickle.loads((data / "encoded.pkl").read_bytes())
    return cfg, tokenizer, model, pairs, families.get(cfg.model.type), torch


def make_loader(pairs, cfg, tokenizer, batch: int):
    """What a user of a bare loop writes: a shuffling DataLoader over pre-tokenized rows, collating per step."""
    from functools import partial

    import torch
    from lowmem_train.trainer.data.encode import collate
    from torch.utils.data import DataLoader

    return DataLoader(pairs, batch_size=batch, shuffle=True, drop_last=True, num_workers=0,
                      collate_fn=partial(collate, pad_id=tokenizer.pad_token_id, model_type=cfg.model.type),
                      generator=torch.Generator().manual_seed(cfg.seed))


def child_torch(data: Path, total: int, warmup: int, device: str = "cpu", precision: str = "no",
                preset: str | None = None, overrides: dict | None = None) -> dict:
    """On a GPU (`device` cuda) as its user writes it: model and AdamW on the device, each batch moved there as the
    loop takes it (`int(tokens)` then waits for the GPU once a step, as a loss printed every step would), and with
    `precision` bf16 the forward under bf16 autocast, fp32 weights and optimizer (Accelerate's mixed precision)."""
    cfg, tokenizer, model, pairs, family, torch = child_common(data, preset, overrides)
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learn_rate, betas=(0.9, 0.999), eps=1e-8,
                                  fused=True)
    loader = make_loader(pairs, cfg, tokenizer, cfg.batch_size_per_gpu)
    schedule_steps = cfg.epochs * len(loader)
    if device != "cpu":
        loader = ({k: v.to(device, non_blocking=True) for k, v in batch.items()} for batch in loader)
    autocast = (lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)) if precision == "bf16" else None
    clock, loss = timed_loop(model, optimizer, loader, family, cfg, schedule_steps, total, warmup,
                             backward=lambda loss: loss.backward(),
                             clip=lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm),
                             autocast=autocast)
    return clock.result(cfg.batch_size_per_gpu, threads=torch.get_num_threads(), last_loss=float(loss),
                        device=device, precision=precision)


def timed_loop(model, optimizer, loader, family, cfg, schedule_steps: int, total: int, warmup: int, backward, clip,
               autocast=None):
    """The loop every hand-written peer times: its own `backward(loss)` and `clip()` (None: the engine clips) and,
    when given, an `autocast()` context around the forward pass; returns the clock and the last loss."""
    clock = Clock(warmup)
    model.train()
    for step, batch in enumerate(loader):
        if step == total:
            break
        set_lr(optimizer, lr_at(step, schedule_steps, cfg))
        tokens = int((batch["labels"] != IGNORE_INDEX).sum())
        with (autocast or contextlib.nullcontext)():
            loss = family.token_loss_sum(model, batch) / max(tokens, 1)
        backward(loss)
        if clip is not None:
            clip()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick(tokens)
    return clock, loss


def child_accelerate(data: Path, total: int, warmup: int, preset: str | None = None,
                     overrides: dict | None = None) -> dict:
    cfg, tokenizer, model, pairs, family, torch = child_common(data, preset, overrides)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learn_rate, betas=(0.9, 0.999), eps=1e-8,
                                  fused=True)
    loader = make_loader(pairs, cfg, tokenizer, cfg.batch_size_per_gpu)
    schedule_steps = cfg.epochs * len(loader)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    clock, loss = timed_loop(model, optimizer, loader, family, cfg, schedule_steps, total, warmup,
                             backward=accelerator.backward,
                             clip=lambda: accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
    return clock.result(cfg.batch_size_per_gpu, threads=torch.get_num_threads(), last_loss=float(loss))


def child_accelerate_ds(data: Path, total: int, warmup: int, preset: str | None = None,
                        overrides: dict | None = None) -> dict | None:
    """Launched by `accelerate launch --config_file accelerate_configs/cpu_2proc_deepspeed.yaml`, one per rank."""
    cfg, tokenizer, model, pairs, family, torch = child_common(data, preset, overrides)
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DummyOptim, InitProcessGroupKwargs

    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = cfg.batch_size_per_gpu
    ds = json.loads(DS_FILE.read_text())  # the launcher's file; every "auto" that accelerate does not fill, filled here
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1, train_batch_size=micro * world,
              gradient_clipping=cfg.max_grad_norm)
    ds["optimizer"]["params"].update(lr=cfg.learn_rate, weight_decay=cfg.weight_decay, betas=[0.9, 0.999], eps=1e-8)
    ds["bf16"]["enabled"] = ds["fp16"]["enabled"] = False
    # Without the gloo handler each rank on a CPU-only machine reports one process and trains alone.
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds),
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    if accelerator.num_processes != world or accelerator.distributed_type.name != "DEEPSPEED":
        raise SystemExit(f"not connected: {accelerator.num_processes} process(es), {accelerator.distributed_type}")
    optimizer = DummyOptim(param_groups(model, cfg.weight_decay), lr=cfg.learn_rate, weight_decay=cfg.weight_decay)
    loader = make_loader(pairs, cfg, tokenizer, micro)
    schedule_steps = cfg.epochs * (len(loader) // world)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # DeepSpeed: backward does clipping and the (offloaded) optimizer step
    clock, loss = timed_loop(model, optimizer, loader, family, cfg, schedule_steps, total, warmup,
                             backward=accelerator.backward, clip=None)
    timed = torch.tensor(sum(clock.tokens[warmup:]), dtype=torch.float64)
    all_tokens = int(accelerator.reduce(timed, reduction="sum"))  # after the clock stopped
    result = clock.result(micro * world, total_tokens=all_tokens, threads=torch.get_num_threads(), world=world,
                          last_loss=float(loss))
    return result if accelerator.is_main_process else None


def child_hf(data: Path, total: int, warmup: int, out: Path, preset: str | None = None,
             overrides: dict | None = None) -> dict:
    """Seq2SeqTrainer with its default optimizer, adamw_torch_fused (torch >= 2.8), named here so that it stays the
    fused kernel whatever a later transformers makes the default."""
    cfg, tokenizer, model, pairs, family, torch = child_common(data, preset, overrides)
    from functools import partial

    from lowmem_train.trainer.data.encode import collate
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    clock = Clock(warmup)
    step_tokens: list[int] = []

    class TokenLossTrainer(Seq2SeqTrainer):
        loss_is_scaled_for_ga = True  # one micro-batch per step: nothing to scale

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            tokens = int((inputs["labels"] != IGNORE_INDEX).sum())
            step_tokens.append(tokens)
            loss = family.token_loss_sum(model, inputs) / max(tokens, 1)
            return (loss, None) if return_outputs else loss

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick(step_tokens[-1])

    args = Seq2SeqTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=cfg.batch_size_per_gpu, max_steps=total,
        learning_rate=cfg.learn_rate, weight_decay=cfg.weight_decay, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_grad_norm=cfg.max_grad_norm, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_ratio,
        optim="adamw_torch_fused", use_cpu=True, report_to=[], eval_strategy="no", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_drop_last=True, dataloader_pin_memory=False,
        dataloader_num_workers=0, remove_unused_columns=False, seed=cfg.seed)
    trainer = TokenLossTrainer(model=model, args=args, train_dataset=pairs, callbacks=[StepClock()],
                               data_collator=partial(collate, pad_id=tokenizer.pad_token_id, model_type=cfg.model.type))
    trainer.train()
    return clock.result(cfg.batch_size_per_gpu, threads=torch.get_num_threads(), optim=str(args.optim))


def run_child(args) -> None:
    data, total, warmup = args.data, args.warmup + args.steps, args.warmup
    preset, overrides = PRESETS[getattr(args, "preset", None) or "t5_tiny"]
    if args.child == "torch":
        result = child_torch(data, total, warmup, preset=preset, overrides=overrides)
    elif args.child == "accelerate":
        result = child_accelerate(data, total, warmup, preset, overrides)
    elif args.child == "accelerate_ds":
        result = child_accelerate_ds(data, total, warmup, preset, overrides)
    elif args.child == "hf":
        result = child_hf(data, total, warmup, args.out, preset, overrides)
    else:
        raise SystemExit(f"unknown child {args.child}")
    if result is not None:
        print(MARK + json.dumps(result), flush=True)
