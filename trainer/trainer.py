"""The training loop. `Trainer.fit` reads top to bottom:

    setup   backend (Accelerate +/- DeepSpeed) -> data -> tokenizer -> model + optimizer -> resume
    loop    for each epoch from the saved position:
              for each global step:   train_step -> memory guard sample -> log -> eval? -> save?
              epoch end:              eval -> save -> memory guard may re-plan (all ranks agree)
    finish  final eval -> final/ (save_pretrained, safetensors) -> exact match printed

The pieces live next door: step.py (one optimizer step), data/ (LowMemDataset), checkpoint.py,
memory/ (probe, policy, guard), evaluate.py, run_log.py.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lowmem_train.config.loader import save_config
from lowmem_train.config.schema import RunConfig
from lowmem_train.model.build import build_model, count_parameters
from lowmem_train.trainer.backend import all_reduce, launched_world_size, make_backend, make_optimizer
from lowmem_train.trainer.checkpoint import Checkpointer, TrainState
from lowmem_train.trainer.data.dataset import LowMemDataset
from lowmem_train.trainer.data.encode import EncodeStats, Encoder, vocab_fingerprint
from lowmem_train.trainer.data.setup import load_datasets
from lowmem_train.trainer.evaluate import EvalResult, Evaluator
from lowmem_train.trainer.memory.estimate import check_fits
from lowmem_train.trainer.memory.guard import MemoryGuard
from lowmem_train.trainer.memory.snapshot import memory_snapshot
from lowmem_train.trainer.memory.policy import OutOfMemoryGiveUp
from lowmem_train.trainer.run_log import RunLog
from lowmem_train.trainer.schedule import lr_at
from lowmem_train.trainer.step import train_step
from lowmem_train.trainer.stop import StopSignal

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    steps: int
    last_eval: EvalResult | None
    stopped_early: bool
    final_dir: Path | None
    exit_code: int = 0


def worker_context():
    """DataLoader workers start from a small fork server, not from the trainer.

    A worker forked from the trainer shares its pages copy-on-write; every page the trainer then rewrites
    (weights, gradients, Adam moments: all of them, every step) stays behind as a private copy in every worker,
    so by the end of an epoch each worker holds about one more copy of the model states (measured: ~0.55 GB
    per worker for t5_small). The fork server imports the data path once, and its workers share those pages.
    """
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "lowmem_train.trainer.data.dataset"])
    return context


def stop_worker_server() -> None:
    """With no workers left (the memory guard shed them), the idle fork server's memory is given back too.

    `_stop` is private but has been in CPython since 3.8 (its tests use it); the server restarts on demand.
    """
    import multiprocessing
    from multiprocessing import forkserver

    # Every worker holds the server's "alive" pipe, and `_stop` waits for the server to exit: stopping it while
    # a worker still lives would block until that worker ends. Such a server is stopped on a later call.
    if multiprocessing.active_children():
        return
    stop = getattr(forkserver._forkserver, "_stop", None)
    if stop is not None and forkserver._forkserver._forkserver_pid is not None:
        stop()


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)

    # ---- the loop ----------------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        self.setup()
        cfg, state = self.cfg, self.state
        try:
            while state.epoch < cfg.epochs and not self.should_stop():
                self.run_log.start_epoch(state.epoch, cfg.epochs, self.dataset.steps_per_epoch(), self.step_in_epoch())
                for batch in self.epoch_batches():
                    self.one_step(batch)
                    if self.should_stop():
                        break
                self.run_log.end_epoch()
                if not self.should_stop():  # the epoch ran to its end
                    self.end_of_epoch()
            if self.stop.flag:
                return self.interrupted()
            return self.finish()
        except OutOfMemoryGiveUp as exc:
            self.save()  # the state before the failed step: nothing of it was applied
            log.error("error: %s. Checkpoint saved; resume with --is_keep_training=True after freeing memory", exc)
            return FitResult(self.state.step, self.last_eval, False, None, exit_code=3)
        finally:
            self.stop.restore()
            self.run_log.close()

    def one_step(self, batch: dict) -> None:
        cfg, state = self.cfg, self.state
        lr = lr_at(state.step, self.total_steps, cfg)
        result = train_step(self.backend, self.model, self.optimizer, batch, self.guard.plan.grad_accum, lr,
                            cfg.max_grad_norm, on_oom=lambda: self.guard.on_oom(state.step).micro_batch)
        state.step += 1
        state.samples_seen += self.global_batch
        self.stats.add(EncodeStats(*batch["stats"].tolist()))
        rate = self.run_log.step(self.global_batch, result.loss, lr, result.grad_norm)
        if state.step % cfg.logging_steps == 0:
            plan = self.guard.plan
            self.run_log.write("train", state.step, epoch=state.epoch, loss=result.loss, lr=lr,
                               grad_norm=result.grad_norm, samples_per_s=rate, tokens=result.tokens,
                               micro_batch=plan.micro_batch, grad_accum=plan.grad_accum)
        self.guard.after_step(state.step, self.run_log)
        if cfg.eval_steps and state.step % cfg.eval_steps == 0:
            self.evaluate()
        if state.step % cfg.save_steps == 0:
            self.save()

    def end_of_epoch(self) -> None:
        state = self.state
        self.log_data_stats()
        self.evaluate()
        if self.backend.is_main:  # before the guard's decision, which consumes the epoch's samples
            snap = memory_snapshot(self.model, self.optimizer, self.backend, self.guard.probe, self.guard.samples,
                                   state.step)
            log.info("%s", snap.describe(tips=self.guard.under_pressure()))
            self.guard.journal_line(snap.to_record())
        state.epoch, state.samples_seen = state.epoch + 1, 0
        if self.guard.at_epoch_end(state.step):
            self.guard.take_loader_change()  # the next epoch builds its loader from the new plan anyway
        self.save()

    def interrupted(self) -> FitResult:
        self.save()
        log.info("stopped by %s at step %d; continue with the same command plus --is_keep_training=True",
                 self.stop.signal_name, self.state.step)
        return FitResult(self.state.step, self.last_eval, False, None)

    def finish(self) -> FitResult:
        state = self.state
        self.save()
        if self.last_eval is None or self.last_eval_step != state.step:
            self.evaluate()
        final_dir = self.checkpointer.export_final(self.model, self.tokenizer, state.step)
        if self.last_eval is not None:
            log.info("done: %d steps; validation loss %.4f, exact match %.2f%% on %d held-out samples; model in %s",
                     state.step, self.last_eval.loss, 100 * self.last_eval.exact_match, self.last_eval.samples, final_dir)
        return FitResult(state.step, self.last_eval, self.stopped_early, final_dir)

    # ---- pieces of the loop ----------------------------------------------------------------------------------
    def should_stop(self) -> bool:
        if self.cfg.max_steps and self.state.step >= self.cfg.max_steps:
            return True
        return self.stop.requested() or self.stopped_early

    def step_in_epoch(self) -> int:
        return self.state.samples_seen // self.global_batch

    def epoch_batches(self):
        """This rank's batches from the saved position to the epoch's end, on a DataLoader built from the
        current plan; rebuilt at the current position when the memory guard changes the loader mid-epoch
        (host emergency, or a MemoryError while collating, which every rank learns of together)."""
        while self.step_in_epoch() < self.dataset.steps_per_epoch():
            self.dataset.load_state_dict(self.state.position())
            batches = None  # the old iterator's workers shut down here (its last reference), before new ones start
            batches = iter(self.make_loader())
            while True:
                try:
                    batch, failed = next(batches, None), 0.0
                except MemoryError:
                    batch, failed = None, 1.0
                if all_reduce(self.backend, [failed], "max")[0]:
                    self.guard.on_host_memory_error(self.state.step)
                    break
                if batch is None:
                    return
                self.check_alignment(batch)
                yield batch
                if self.guard.take_loader_change():
                    break

    def check_alignment(self, batch: dict) -> None:
        """The loader and the loop must agree on the position; anything else is a bug, so fail loudly."""
        if int(batch["step"]) != self.step_in_epoch() or int(batch["epoch"]) != self.state.epoch:
            raise RuntimeError(f"data loader at epoch {int(batch['epoch'])} step {int(batch['step'])}, "
                               f"trainer at epoch {self.state.epoch} step {self.step_in_epoch()}")

    def evaluate(self) -> None:
        if self.evaluator is None:
            return
        t0 = time.perf_counter()
        result = self.evaluator.run(self.model)
        self.last_eval, self.last_eval_step = result, self.state.step
        self.run_log.write("eval", self.state.step, epoch=self.state.epoch, loss=result.loss,
                           perplexity=result.perplexity, exact_match=result.exact_match, samples=result.samples)
        log.info("eval @ step %d: loss %.4f ppl %.3f exact match %.2f%% (%d samples, %.1fs)", self.state.step,
                 result.loss, result.perplexity, 100 * result.exact_match, result.samples, time.perf_counter() - t0)
        for prompt, expected, got in result.examples:
            log.info("  %s -> %s %s", prompt, got, "ok" if got == expected.replace(" ", "") else f"(expected {expected})")
        if result.loss < self.state.best_loss - 1e-12:
            self.state.best_loss, self.state.bad_evals = result.loss, 0
        else:
            self.state.bad_evals += 1
            if self.cfg.patience and self.state.bad_evals >= self.cfg.patience:
                log.info("early stop: no better validation loss in %d evaluations", self.state.bad_evals)
                self.stopped_early = True

    def save(self) -> None:
        self.state.plan = self.guard.state_dict()
        self.checkpointer.save(self.state, self.model, self.optimizer, self.last_eval)

    def log_data_stats(self) -> None:
        s = self.stats.as_dict()
        dropped = self.dataset.dropped_per_epoch()
        if any(s[k] for k in ("skipped_null", "skipped_overlong", "truncated")) or dropped:
            log.info("epoch %d data: %d rows, %d null skipped, %d too long %s, %d rows %s to fill the last step",
                     self.state.epoch + 1, s["rows"], s["skipped_null"], s["skipped_overlong"] + s["truncated"],
                     "skipped" if self.cfg.data.overlong == "skip" else "truncated", abs(dropped),
                     "dropped" if dropped >= 0 else "repeated")
        self.stats = EncodeStats()

    # ---- setup ---------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we parallelise with DataLoader workers
        self.checkpointer = Checkpointer(cfg)
        resume = self.checkpointer.find_resume() if cfg.is_keep_training else None
        self.guard = MemoryGuard.from_config(cfg, resume.plan if resume else None, launched_world_size())
        self.backend = make_backend(cfg, self.guard.plan.micro_batch, self.guard.plan.grad_accum)
        # Pre-flight: refuse a run that cannot fit before anything heavy exists (all ranks reach one verdict).
        fit = check_fits(cfg, self.backend.world_size, self.guard.plan,
                         agree=lambda bad: all_reduce(self.backend, [bad], "max")[0])
        (log.info if fit.fits else log.warning)("%s", fit.line)
        self.checkpointer.attach(self.backend)
        self.stop = StopSignal(self.backend)
        world = self.backend.world_size
        self.global_batch = self.guard.plan.global_batch(world)
        data = load_datasets(cfg, self.backend)
        self.tokenizer, self.train_index = data.tokenizer, data.train_index
        self.checkpointer.vocab = vocab_fingerprint(self.tokenizer)
        if resume is not None:
            self.checkpointer.check_compatible(resume)
            self.checkpointer.prepare_world_size_change(resume)
        self.model = build_model(cfg, self.tokenizer)
        if cfg.is_finetune:
            self.checkpointer.load_finetune_weights(self.model)
        optimizer = make_optimizer(self.backend, self.model, cfg)
        self.model, self.optimizer = self.backend.accelerator.prepare(self.model, optimizer)
        self.guard.attach(self.backend, self.model, self.out)
        encoder = Encoder(self.tokenizer, cfg.model.type, cfg.max_seq_len, cfg.data.overlong)
        self.dataset = LowMemDataset(self.train_index, encoder, self.tokenizer.pad_token_id, self.global_batch,
                                     self.backend.rank, world, cfg.seed, cfg.data.shuffle_buffer, cfg.data.remainder)
        self.evaluator = None
        if data.validation_index is not None:
            self.evaluator = Evaluator(self.backend, data.validation_index, Encoder(self.tokenizer, cfg.model.type,
                                       cfg.max_seq_len, "truncate"), 2 * self.guard.plan.micro_batch,
                                       cfg.data.eval_max_samples)
        # The schedule spans all epochs; max_steps only stops early, so a later resume continues it exactly.
        self.total_steps = cfg.epochs * self.dataset.steps_per_epoch()
        self.state = TrainState(world_size=world, global_batch=self.global_batch)
        self.last_eval, self.last_eval_step, self.stopped_early = None, -1, False
        self.stats = EncodeStats()
        if resume is not None:
            self.resume_from(resume)
        self.run_log = RunLog(self.out, self.backend.is_main)
        if resume is not None:  # metrics of steps after this checkpoint (from a killed run) are superseded
            self.run_log.write("resume", self.state.step, epoch=self.state.epoch, checkpoint=resume.path.name)
        self.guard.preflight(self.state.step)
        if self.backend.is_main:
            save_config(cfg, self.out / "config.yaml")
        self.describe(count_parameters(self.backend.accelerator.unwrap_model(self.model)))

    def resume_from(self, resume) -> None:
        state = self.checkpointer.load(resume, self.model, self.optimizer)
        if state.global_batch != self.global_batch:  # only with --allow_batch_change
            rounded = state.samples_seen // self.global_batch * self.global_batch
            log.warning("global batch %d -> %d: data position %d rounded down to %d (%d samples seen twice)",
                        state.global_batch, self.global_batch, state.samples_seen, rounded, state.samples_seen - rounded)
            state.samples_seen = rounded
        state.world_size, state.global_batch = self.backend.world_size, self.global_batch
        self.state = state
        self.stopped_early = bool(self.cfg.patience and state.bad_evals >= self.cfg.patience)

    def make_loader(self) -> DataLoader:
        kwargs = self.guard.plan.loader_kwargs()
        kwargs["pin_memory"] = kwargs["pin_memory"] and torch.cuda.is_available()
        kwargs["batch_size"] = None  # the dataset yields whole per-rank steps already
        if kwargs["num_workers"]:
            kwargs["multiprocessing_context"] = worker_context()
        else:
            stop_worker_server()
        # Its own generator: creating an iterator must not draw from the global RNG that dropout uses,
        # or a resumed run (which creates its iterator at another moment) would see other dropout masks.
        return DataLoader(self.dataset, persistent_workers=False, generator=torch.Generator().manual_seed(self.cfg.seed),
                          **kwargs)

    def describe(self, params: int) -> None:
        b, cfg, plan = self.backend, self.cfg, self.guard.plan
        engine = f"DeepSpeed ZeRO-{b.zero_stage}" + (" + optimizer offload to CPU" if
                 b.ds_config and b.ds_config["zero_optimization"].get("offload_optimizer", {}).get("device") == "cpu"
                 else "") if b.uses_deepspeed else "plain Accelerate (no DeepSpeed)"
        where = f"{b.world_size} process(es) on {b.accelerator.device}" + (
            f" ({b.accelerator.distributed_type.name})" if b.world_size > 1 else "")
        log.info("%s %s, %.2fM parameters; %s; %s; precision %s", cfg.model.type, cfg.output_dir, params / 1e6, where,
                 engine, b.precision)
        log.info("data: %d training rows in %d row groups -> %d steps/epoch x %d epochs (global batch %d = micro %d x "
                 "accumulation %d x %d processes); from epoch %d step %d", self.train_index.num_rows,
                 len(self.train_index.units), self.dataset.steps_per_epoch(), cfg.epochs, self.global_batch,
                 plan.micro_batch, plan.grad_accum, b.world_size, self.state.epoch + 1, self.state.step)
