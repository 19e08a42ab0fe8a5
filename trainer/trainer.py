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

from lowmem_train.config.errors import ConfigError
from lowmem_train.config.loader import save_config
from lowmem_train.config.schema import RunConfig
from lowmem_train.model import families
from lowmem_train.model.adapt import counts, prepare_trained
from lowmem_train.model.build import build_model
from lowmem_train.model.pretrained import ARCHITECTURE
from lowmem_train.trainer import denormals, distributed, host_allocator, run_folder, threads
from lowmem_train.trainer.backend import launched_world_size, make_backend, make_optimizer
from lowmem_train.trainer.checkpoint import Checkpointer, OutOfDisk, needs_universal
from lowmem_train.trainer.compat import full_numel
from lowmem_train.trainer.data.dataset import LowMemDataset
from lowmem_train.trainer.data.encode import EncodeStats, Encoder, vocab_fingerprint
from lowmem_train.trainer.data.loader import batches_of
from lowmem_train.trainer.data.setup import check_input_files, load_datasets
from lowmem_train.trainer.evaluate import EvalResult, Evaluator
from lowmem_train.trainer.faults import ALLOCATE, CRASH
from lowmem_train.trainer.memory.estimate import check_fits
from lowmem_train.trainer.memory.guard import MemoryGuard
from lowmem_train.trainer.memory.policy import OutOfMemoryGiveUp
from lowmem_train.trainer.memory.snapshot import memory_snapshot
from lowmem_train.trainer.metrics import LOWER_IS_BETTER, normalised
from lowmem_train.trainer.run_log import RunLog
from lowmem_train.trainer.schedule import lr_at
from lowmem_train.trainer.state import TrainState
from lowmem_train.trainer.step import LoaderFailed, OutOfMemoryInCollective, train_step
from lowmem_train.trainer.stop import SnapshotRequest, StopSignal

log = logging.getLogger(__name__)
END = object()  # the loader has no more batches in this epoch


@dataclass
class FitResult:
    steps: int
    last_eval: EvalResult | None
    stopped_early: bool
    final_dir: Path | None
    outcome: str = "finished"  # finished | stopped (by a signal, saved) | out_of_memory (saved) | oom_in_backward
    # (oom_in_backward: out of memory where the step could not be redone in place, OutOfMemoryInCollective)


class Trainer:
    def __init__(self, cfg: RunConfig, on_peer_lost=None, on_started=None):
        """`on_peer_lost(message, announced_reason)`: called from a watch thread when another rank is gone
        (distributed.PeerWatch); it must end the process (the main thread may be stuck in a collective).
        `on_started()`: called once setup has passed every check that can refuse the run, before the first step
        (the train command then marks the run folder's status as started)."""
        self.cfg, self.on_peer_lost, self.on_started = cfg, on_peer_lost, on_started
        self.out = Path(cfg.output_dir)
        self.peers = None
        self.denormals_were_flushed: bool | None = None  # as found by setup (restored when fit ends)
        self.threads_were: int | None = None  # torch's CPU threads as found by setup (restored when fit ends)

    # ---- the loop ----------------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        try:
            self.setup()
        except BaseException as exc:
            self.restore_process_settings()
            # A user error is often seen by one rank alone (rank 0 checks the data first): the others hear why.
            if isinstance(exc, ConfigError) and self.peers is not None:
                self.peers.done("user_error")
            raise
        cfg, state = self.cfg, self.state
        result, failure = None, "crashed"
        if self.on_started is not None:
            self.on_started()
        try:
            while state.position.epoch < cfg.epochs and not self.stop.agree() and not self.should_stop():
                self.run_log.start_epoch(state.position.epoch, cfg.epochs, self.dataset.steps_per_epoch(), self.step_in_epoch())
                for batch in self.epoch_batches():
                    self.one_step(batch)
                    if self.should_stop():
                        break
                self.run_log.end_epoch()
                if not self.should_stop():  # the epoch ran to its end
                    self.end_of_epoch()
            result = self.interrupted() if self.stop.agreed else self.finish()
        except OutOfMemoryGiveUp as exc:
            self.save()  # the state before the failed step: nothing of it was applied
            log.error("error: %s. Checkpoint saved; resume with --is_keep_training=True after freeing memory", exc)
            result = FitResult(self.state.step, self.last_eval, False, None, outcome="out_of_memory")
        except OutOfMemoryInCollective as exc:
            # Half of a step's gradients may be reduced and other ranks may wait inside its collectives: no save, no
            # retry here. The smaller plan waits in output_dir for the next start, which resumes from the last
            # checkpoint; the other ranks hear of it (peer watch) and end too.
            log.error("error: %s; restart with --is_keep_training=auto",
                      self.guard.record_oom_in_collective(self.state.step, str(exc)))
            result = FitResult(self.state.step, self.last_eval, False, None, outcome="oom_in_backward")
        except OutOfDisk:
            failure = "out_of_disk"  # every rank raises it at the same save (Checkpointer.has_disk_space agrees)
            raise
        except ConfigError:
            failure = "user_error"
            raise
        finally:
            self.restore_process_settings()
            self.stop.restore()
            self.snapshot_request.restore()
            self.run_log.close()
            if self.peers is not None:  # what the other ranks hear, and record as this run's outcome if they must end
                self.peers.done(failure if result is None else
                                "done" if result.outcome in ("finished", "stopped") else result.outcome)
        return result

    def one_step(self, batch: dict) -> None:
        cfg, state = self.cfg, self.state
        CRASH.during_step(state.step + 1, self.backend.rank)  # test seams (faults.py); no-ops unless asked for
        ALLOCATE.during_step(state.step + 1)
        lr = lr_at(state.step, self.total_steps, cfg)
        plan = self.guard.plan
        try:
            result = train_step(self.backend, self.model, self.optimizer, self.family, batch, plan.micro_batch,
                                plan.grad_accum, lr, cfg.max_grad_norm,
                                on_oom=lambda: self.guard.on_oom(state.step).micro_batch, stop_asked=self.stop.flag)
        except LoaderFailed:  # no rank went into backward: shed loader memory and redo this step on a new loader
            self.guard.on_host_memory_error(state.step)
            return
        self.stop.heard(result.stop)
        state.step += 1
        state.position.samples_seen += self.global_batch
        self.stats.add(EncodeStats(*batch["stats"].tolist()))
        self.cells[0] += result.cells
        self.cells[1] += result.pad_cells
        rate = self.run_log.step(self.global_batch, result.loss, lr, result.grad_norm)
        if state.step % cfg.logging_steps == 0:
            plan = self.guard.plan
            self.run_log.write("train", state.step, epoch=state.position.epoch, loss=result.loss, lr=lr,
                               grad_norm=result.grad_norm, samples_per_s=rate, tokens=result.tokens,
                               target_tokens_per_s=round(rate * result.tokens / self.global_batch, 1),
                               pad_fraction=round(result.pad_cells / max(result.cells, 1), 4),
                               micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
                               data_wait_ms=round(1000 * self.data_wait / cfg.logging_steps, 3))
            self.data_wait = 0.0
        self.guard.after_step(state.step, self.run_log)
        if self.snapshot_request.take():  # kill -USR1: a snapshot now, training goes on
            self.log_snapshot(tips=True)
        if cfg.eval_steps and state.step % cfg.eval_steps == 0:
            self.evaluate()
        if state.step % cfg.save_steps == 0:
            self.save()

    def end_of_epoch(self) -> None:
        state = self.state
        self.log_data_stats()
        self.evaluate()
        if self.backend.is_main:  # before the guard's decision, which consumes the epoch's samples
            self.log_snapshot(tips=self.guard.under_pressure())
        state.position.epoch, state.position.samples_seen = state.position.epoch + 1, 0
        if self.guard.at_epoch_end(state.step):
            self.guard.take_loader_change()  # the next epoch builds its loader from the new plan anyway
        self.save()

    def log_snapshot(self, tips: bool) -> None:
        """This rank's memory by part (weights, gradients, optimizer, workers, the rest), logged and journaled."""
        snap = memory_snapshot(self.model, self.optimizer, self.backend, self.guard.probe, self.guard.samples,
                               self.state.step)
        (log.info if self.backend.is_main else log.warning)("%s", snap.describe(tips=tips))
        self.guard.journal_line(snap.to_record())

    def interrupted(self) -> FitResult:
        self.save()
        log.info("stopped by %s at step %d; continue with the same command plus --is_keep_training=True",
                 self.stop.signal_name, self.state.step)
        return FitResult(self.state.step, self.last_eval, False, None, outcome="stopped")

    def finish(self) -> FitResult:
        state = self.state
        self.save()
        if self.last_eval is None or self.last_eval_step != state.step:
            self.evaluate()
        final_dir = self.checkpointer.export_final(self.model, self.tokenizer, state.step)
        if self.last_eval is not None:
            scores, cases = self.last_eval.describe_scores(), self.last_eval.describe_cases()
            log.info("done: %d steps (%s samples/s); validation loss %.4f%s on %d held-out samples%s; model in %s",
                     state.step, f"{self.run_log.samples_per_s():,.0f}", self.last_eval.loss,
                     f", {scores}" if scores else "", self.last_eval.samples, f" ({cases})" if cases else "", final_dir)
        return FitResult(state.step, self.last_eval, self.stopped_early, final_dir)

    # ---- pieces of the loop ----------------------------------------------------------------------------------
    def should_stop(self) -> bool:
        """Known alike on every rank without a collective (a stop request is agreed within the step)."""
        if self.cfg.max_steps and self.state.step >= self.cfg.max_steps:
            return True
        return self.stop.agreed or self.stopped_early

    def step_in_epoch(self) -> int:
        return self.state.position.samples_seen // self.global_batch

    def epoch_batches(self):
        """This rank's batches from the saved position to the epoch's end, on a DataLoader built from the
        current plan; rebuilt at the current position when the memory guard changes the loader mid-epoch
        (host emergency, or a MemoryError while collating: None is yielded, and the step tells every rank)."""
        while self.step_in_epoch() < self.dataset.steps_per_epoch():
            self.dataset.load_state_dict(self.state.position.state_dict())
            with batches_of(self.dataset, self.guard.plan, self.cfg.seed) as batches:
                while True:
                    waited = time.perf_counter()
                    try:
                        batch = next(batches, END)
                    except MemoryError:  # the step's agreement tells every rank (LoaderFailed, one_step)
                        batch = None
                    self.data_wait += time.perf_counter() - waited  # the training thread idle, waiting for data
                    if batch is END:  # every rank has the same number of steps: all get here together
                        return
                    if batch is not None:
                        self.check_alignment(batch)
                    yield batch
                    if self.guard.take_loader_change():
                        break

    def check_alignment(self, batch: dict) -> None:
        """The loader and the loop must agree on the position; anything else is a bug, so fail loudly."""
        epoch = self.state.position.epoch
        if int(batch["step"]) != self.step_in_epoch() or int(batch["epoch"]) != epoch:
            raise RuntimeError(f"data loader at epoch {int(batch['epoch'])} step {int(batch['step'])}, "
                               f"trainer at epoch {epoch} step {self.step_in_epoch()}")

    def evaluate(self) -> None:
        if self.evaluator is None:
            return
        t0 = time.perf_counter()
        result = self.evaluator.run(self.model, 2 * self.guard.plan.micro_batch)  # where training fits (evaluate.py)
        self.last_eval, self.last_eval_step = result, self.state.step
        self.run_log.write("eval", self.state.step, epoch=self.state.position.epoch, loss=result.loss,
                           perplexity=result.perplexity, samples=result.samples, batch_size=result.batch_size,
                           **result.scores,
                           **{f"exact_match/{case}": c / max(n, 1) for case, (c, n) in result.by_case.items()})
        scores, cases = result.describe_scores(), result.describe_cases()
        log.info("eval @ step %d: loss %.4f ppl %.3f%s (%d samples, %.1fs)%s", self.state.step, result.loss,
                 result.perplexity, f" {scores}" if scores else "", result.samples, time.perf_counter() - t0,
                 f"; by case: {cases}" if cases else "")
        for prompt, expected, got in result.examples:
            log.info("  %s -> %s %s", prompt, got, "ok" if normalised(got) == normalised(expected) else
                     f"(expected {expected})")
        # --eval.best_metric, as a loss (lower is better): it keeps the best checkpoint and drives --patience.
        name = self.cfg.eval.best_metric
        score = result.value(name) * (1 if LOWER_IS_BETTER[name] else -1)
        if score < self.state.best_score - 1e-12:
            self.state.best_score, self.state.bad_evals = score, 0
        else:
            self.state.bad_evals += 1
            if self.cfg.patience and self.state.bad_evals >= self.cfg.patience:
                log.info("early stop: no better validation %s in %d evaluations", name, self.state.bad_evals)
                self.stopped_early = True

    def save(self) -> None:
        self.state.plan = self.guard.state_dict()
        if self.checkpointer.save(self.state, self.model, self.optimizer, self.last_eval) is not None:
            self.guard.saved()

    def log_data_stats(self) -> None:
        s = self.stats.as_dict()
        dropped = self.dataset.dropped_per_epoch()
        cells, pad = self.cells
        self.cells = [0, 0]
        share = pad / cells if cells else 0.0
        hint = (self.cfg.gradient_accumulation_steps > 1 or self.guard.plan.grad_accum > 1) and share > 0.25
        log.info("epoch %d data: %.1f%% of the token positions computed on were padding (this rank)%s",
                 self.state.position.epoch + 1, 100 * share,
                 "; --data.group_by_length=True makes micro-batches of rows of similar length"
                 if hint and not self.cfg.data.group_by_length else "")
        if any(s[k] for k in ("skipped_null", "skipped_overlong", "truncated")) or dropped:
            log.info("epoch %d data: %d rows, %d null skipped, %d too long %s, %d rows %s to fill the last step",
                     self.state.position.epoch + 1, s["rows"], s["skipped_null"], s["skipped_overlong"] + s["truncated"],
                     "skipped" if self.cfg.data.overlong == "skip" else "truncated", abs(dropped),
                     "dropped" if dropped >= 0 else "repeated")
        self.stats = EncodeStats()

    def restore_process_settings(self) -> None:
        """Settings of the whole process that setup changed, as found (a caller that trains in-process, from a
        notebook or a test, gets its process back as it was)."""
        if self.denormals_were_flushed is not None:
            denormals.restore(self.denormals_were_flushed)
        if self.threads_were is not None:
            torch.set_num_threads(self.threads_were)

    # ---- setup ---------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we parallelise with DataLoader workers
        self.threads_were = torch.get_num_threads()
        self.cpu_threads = threads.threads_per_rank(cfg.cpu_threads, os.environ, threads.usable_cores()[0])
        threads.apply(self.cpu_threads[0])  # before the optimizer (CPU Adam) and the first parallel op
        if cfg.optimizer == "adafactor":  # its freed temporaries leave the process; costs speed (host_allocator.py)
            host_allocator.return_large_blocks()
        if cfg.flush_denormal:  # before anything starts torch's thread pool
            self.denormals_were_flushed, denormal_warning = denormals.flush_denormals()
        else:
            self.denormals_were_flushed, denormal_warning = None, None
        self.family = families.get(cfg.model.type)
        self.checkpointer = Checkpointer(cfg)
        check_input_files(cfg)
        start = run_folder.plan_start(cfg)  # resume, start fresh, or refuse: before anything heavy exists
        resume = start.resume
        self.guard = MemoryGuard.from_config(cfg, resume.plan if resume else None, launched_world_size(),
                                             resume.state.step if resume else 0)
        plan = self.guard.plan
        self.backend = make_backend(cfg, plan.micro_batch, plan.grad_accum,
                                    load_universal=needs_universal(resume, launched_world_size()))
        run_folder.enter(start, cfg, self.backend)
        if denormal_warning:
            log.warning("%s (--flush_denormal)", denormal_warning)
        if self.on_peer_lost is not None:
            self.peers = distributed.PeerWatch.start(self.backend, cfg.peer_timeout_seconds, self.on_peer_lost)
        # Pre-flight: refuse a run that cannot fit before anything heavy exists (all ranks reach one verdict).
        fit = check_fits(cfg, self.backend.world_size, plan, agree=lambda bad: distributed.agree_any(self.backend, bad),
                         on_device=True)
        (log.info if fit.fits else log.warning)("%s", fit.line)
        self.checkpointer.attach(self.backend)
        self.stop = StopSignal(self.backend)
        self.snapshot_request = SnapshotRequest()
        world = self.backend.world_size
        self.global_batch = plan.global_batch(world)
        data = load_datasets(cfg, self.backend.is_main, lambda: distributed.rank_zero_first(self.backend))
        self.tokenizer, self.train_index = data.tokenizer, data.train_index
        self.checkpointer.vocab = vocab_fingerprint(self.tokenizer)
        if resume is not None:
            self.checkpointer.check_compatible(resume)
            self.checkpointer.prepare_world_size_change(resume)
        architecture = resume.path / ARCHITECTURE if resume and (resume.path / ARCHITECTURE).is_dir() else None
        with self.backend.model_init():
            self.model = build_model(cfg, self.tokenizer, architecture)
        if cfg.model.name_or_path and (resume is None or resume.trained_only):  # base weights: the folder's
            self.checkpointer.load_pretrained(self.model)
        if cfg.lora.r and self.backend.zero_stage == 3:
            raise ConfigError("--lora.r with ZeRO-3: peft's adapters on partitioned parameters are not supported "
                              "here; use ZeRO-2 (--deepspeed_config=zero2_offload) or no DeepSpeed")
        self.model = prepare_trained(self.model, cfg, self.family)  # --freeze, --lora.*: model/adapt.py
        self.model, self.optimizer = self.backend.prepare(self.model, make_optimizer(self.backend, self.model, cfg))
        self.guard.attach(self.backend, self.model, self.out)
        encoder = Encoder(self.tokenizer, cfg.model.type, cfg.max_seq_len, cfg.data.overlong)
        self.dataset = LowMemDataset(self.train_index, encoder, self.tokenizer.pad_token_id, self.global_batch,
                                     self.backend.rank, world, cfg.seed, cfg.data.shuffle_buffer, cfg.data.remainder,
                                     cfg.data.group_by_length)
        self.evaluator = None
        if data.validation_index is not None:
            self.evaluator = Evaluator(self.backend, data.validation_index, Encoder(self.tokenizer, cfg.model.type,
                                       cfg.max_seq_len, "truncate"), cfg.data.eval_max_samples,
                                       tuple(cfg.eval.metrics), cfg.eval.generate)
        # The schedule spans all epochs; max_steps only stops early, so a later resume continues it exactly.
        self.total_steps = cfg.epochs * self.dataset.steps_per_epoch()
        self.state = TrainState(world_size=world, global_batch=self.global_batch)
        self.last_eval, self.last_eval_step, self.stopped_early = None, -1, False
        self.data_wait = 0.0  # seconds the training thread waited for batches since the last metrics line
        self.stats, self.cells = EncodeStats(), [0, 0]  # data counts and (cells, pad cells) of this epoch
        if resume is not None:
            self.resume_from(resume)
        self.run_log = RunLog(self.out, self.backend.is_main, cfg.log_every_seconds)
        if resume is not None:  # metrics of steps after this checkpoint (from a killed run) are superseded
            self.run_log.write("resume", self.state.step, epoch=self.state.position.epoch, checkpoint=resume.path.name)
        # A per-rank batch as workers hand it over through /dev/shm: 5 int64 tensors (ids, mask, labels, decoder
        # inputs, positions) of at most max_seq_len columns, a bound of what the guard must leave room for.
        self.guard.batch_bytes = 5 * 8 * cfg.max_seq_len * (self.global_batch // world)
        self.guard.preflight(self.state.step, fit)
        if self.backend.is_main:
            save_config(cfg, self.out / "config.yaml")
        self.describe(sum(full_numel(p) for p in self.backend.accelerator.unwrap_model(self.model).parameters()))

    def resume_from(self, resume) -> None:
        state = self.checkpointer.load(resume, self.model, self.optimizer)
        if state.global_batch != self.global_batch:  # only with --allow_batch_change
            seen = state.position.samples_seen
            rounded = seen // self.global_batch * self.global_batch
            log.warning("global batch %d -> %d: data position %d rounded down to %d (%d samples seen twice)",
                        state.global_batch, self.global_batch, seen, rounded, seen - rounded)
            state.position.samples_seen = rounded
        state.world_size, state.global_batch = self.backend.world_size, self.global_batch
        self.state = state
        self.stopped_early = bool(self.cfg.patience and state.bad_evals >= self.cfg.patience)

    def describe(self, params: int) -> None:
        b, cfg, plan = self.backend, self.cfg, self.guard.plan
        engine = b.describe()
        where = f"{b.world_size} process(es) on {b.accelerator.device}" + (
            f" ({b.accelerator.distributed_type.name})" if b.world_size > 1 else "")
        origin = f" from {cfg.model.name_or_path}" if cfg.model.name_or_path else ""
        log.info("%s %s, %.2fM parameters%s; %s; %s; precision %s; %d CPU threads per rank (%s)", cfg.model.type,
                 cfg.output_dir, params / 1e6, origin, where, engine, b.precision, *self.cpu_threads)
        trained, frozen = counts(b.accelerator.unwrap_model(self.model))
        if frozen:
            what = (f"LoRA r={cfg.lora.r} adapters" if cfg.lora.r else f"all but --freeze {','.join(cfg.freeze)}")
            log.info("training %s of %s parameters (%s; %s frozen), optimizer %s", f"{trained:,}",
                     f"{trained + frozen:,}", what, f"{frozen:,}", cfg.optimizer)  # exact: a small adapter shows
        log.info("data: %d training rows in %d row groups -> %d steps/epoch x %d epochs (global batch %d = micro %d x "
                 "accumulation %d x %d processes); from epoch %d step %d", self.train_index.num_rows,
                 len(self.train_index.units), self.dataset.steps_per_epoch(), cfg.epochs, self.global_batch,
                 plan.micro_batch, plan.grad_accum, b.world_size, self.state.position.epoch + 1, self.state.step)
