"""The one typed configuration tree of a run.

Every field has a default (the `t5_tiny` preset), a type, and a docstring right under it: the docstring is
what `--help` prints, so keep it to one line. Checks that involve a single field or several fields live in
`RunConfig.validate()`, nowhere else. YAML presets in this folder hold only the fields that differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lowmem_train.config.errors import ConfigError
from lowmem_train.config.memory import MemoryConfig


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """A pretrained model folder in save_pretrained format (config.json + safetensors; its tokenizer too unless --tokenizer_dir names another). Its config.json sets the family and shape; nothing is downloaded."""
    type: str = "t5"
    """Model family: t5 (encoder-decoder, T5ForConditionalGeneration), gpt (causal, GPT2LMHeadModel), llama (causal, LlamaForCausalLM) or another in model/families/."""
    d_model: int = 128
    """Hidden size."""
    num_layers: int = 2
    """Encoder layers (t5) or transformer blocks (gpt)."""
    num_decoder_layers: int = 2
    """Decoder layers (t5 only)."""
    num_heads: int = 4
    """Attention heads."""
    d_ff: int = 512
    """Feed-forward inner size."""
    dropout: float | None = None
    """Dropout rate (default: a pretrained model's own, else 0; 0.1 is the T5 default for large models)."""
    vocab_size: int = 64
    """Vocabulary size when a tokenizer is trained (a small value gives a character-level vocabulary)."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel: sdpa (PyTorch scaled-dot-product attention) or eager."""


@dataclass
class DataConfig:
    prompt_column: str = "prompt"
    """Parquet column holding the input text."""
    response_column: str = "response"
    """Parquet column holding the target text."""
    num_workers: int = 0
    """DataLoader worker processes at start (the memory guard may change it at epoch boundaries)."""
    pin_memory: bool = False
    """Pin host memory of batches for faster GPU copies (only useful with a GPU)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead (only with num_workers > 0)."""
    shuffle_buffer: int = 8192
    """Rows shuffled together; host memory is bounded by this, not by the file size."""
    group_by_length: bool = False
    """Sort each step's rows by length: micro-batches of similar rows, less padding, the same update (helps when grad_accum > 1)."""
    remainder: Literal["drop", "pad"] = "drop"
    """Last partial global batch of an epoch: drop it, or pad it by repeating samples from the epoch's start."""
    overlong: Literal["truncate", "skip"] = "truncate"
    """Rows longer than max_seq_len tokens: truncate them or skip them (counted in the log either way)."""
    eval_max_samples: int = 0
    """Validation rows scored per evaluation (0 = the whole validation file)."""
    case_column: str = "case"
    """Validation column naming each row's case: exact match is also reported per case (ignored when absent)."""


# Learning rates that trained t5_tiny on the bundled task to the README's figures, by optimizer (the default
# learn_rate is AdamW's; --optimizer adafactor without --learn_rate takes its own). Adafactor, one epoch from
# scratch: 1e-3 99.95% held-out exact match; 3e-3 0.15% and 1e-2 worse (no first moment: the loss stalls near 1.4).
# 1e-3 is also what transformers documents for T5 with these settings.
ADAFACTOR_LEARN_RATE = 1e-3


@dataclass
class AdapterConfig:
    r: int = 0
    """LoRA rank (peft): 0 trains the model itself; 8 or 16 train low-rank adapters only, on a frozen base."""
    alpha: float = 16.0
    """LoRA alpha (peft's lora_alpha): the adapters' update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: list[str] = field(default_factory=list)
    """Modules that get adapters (default: the attention's query and value projections: t5 q,v; gpt c_attn; llama q_proj,v_proj)."""


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=lambda: ["exact_match"])
    """Scores of generated answers: exact_match, bleu (sacrebleu, Chinese tokenisation), rouge_l (character ROUGE-L F1); loss and perplexity always."""
    generate: bool = True
    """Generate answers and score them (false: loss and perplexity only, several times faster)."""
    best_metric: str = "loss"
    """The validation figure that picks the best checkpoint and that --patience watches: loss, or one of --eval.metrics."""


@dataclass
class RunConfig:
    # ---- what to train on -------------------------------------------------------------------------------
    train_file: str = "data/zh_numerals/train.parquet"
    """Training parquet: a file, a directory or a glob (the bundled task is generated here when missing)."""
    validation_file: str = "data/zh_numerals/validation.parquet"
    """Validation parquet (empty string: no validation)."""
    tokenizer_dir: str = "data/zh_numerals/tokenizer"
    """Tokenizer folder: reused when it exists, otherwise trained from train_file and saved here."""
    output_dir: str = "out/t5_tiny"
    """Run folder: resolved config, metrics.jsonl, checkpoints/, final/."""
    max_seq_len: int = 32
    """Maximum tokens of a prompt or a response (t5), or of prompt + response (gpt)."""

    # ---- optimisation -----------------------------------------------------------------------------------
    epochs: int = 1
    """Passes over the training data."""
    batch_size_per_gpu: int = 128
    """Micro-batch per process at start (the memory guard may change it, keeping the global batch)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step at start; global batch = batch_size_per_gpu x this x processes."""
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    """adamw (torch AdamW, fused) or adafactor (transformers' Adafactor as for T5: factored second moment, no first moment, fixed lr under the schedule; without DeepSpeed)."""
    learn_rate: float = 3e-3
    """Peak learning rate, reached after warmup, then cosine decay (default 3e-3 with adamw, 1e-3 with adafactor)."""
    div_factor: float = 25.0
    """Warmup starts at learn_rate / div_factor (the prior art's OneCycle div_factor)."""
    warmup_ratio: float = 0.05
    """Fraction of all optimizer steps spent warming up."""
    final_lr_ratio: float = 0.02
    """Cosine decay ends at learn_rate x this."""
    weight_decay: float = 0.01
    """Weight decay (decoupled), on weights other than biases and norms."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 = off)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 on a GPU that supports it, fp32 on CPU (bf16 autocast there is slower than it saves)."""
    flush_denormal: bool = True
    """On the CPU, compute with floats below 1.2e-38 as zero (FTZ/DAZ): near convergence such tiny gradients and
    optimizer moments slow CPU arithmetic several-fold (t5_tiny: 86 -> 142 ms a step). GPU kernels: no effect."""
    cpu_threads: int = 0
    """CPU threads per rank for torch and DeepSpeed's CPU Adam (0: OMP_NUM_THREADS if set above 1, else usable cores / processes on this machine)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (the memory guard may turn it on)."""
    seed: int = 23333
    """Seed of weights, data order and dropout."""
    deepspeed_config: str = "auto"
    """A DeepSpeed JSON path or shipped name (zero2_offload, zero2, zero3_offload), none, or auto (zero2_offload unless 1 CPU process)."""

    # ---- evaluation, logging, checkpoints ----------------------------------------------------------------
    logging_steps: int = 20
    """Optimizer steps between metric lines in metrics.jsonl / TensorBoard."""
    log_every_seconds: float = 30.0
    """Seconds between progress lines when stderr is not a terminal (a log file, Slurm, docker logs); a bar otherwise."""
    eval_steps: int = 0
    """Optimizer steps between validations (0 = at each epoch end only)."""
    patience: int = 0
    """Stop after this many validations without a better --eval.best_metric (0 = never stop early)."""
    save_steps: int = 500
    """Optimizer steps between checkpoints (a checkpoint is also written at each epoch end)."""
    keep_latest_n_ckp: int = 3
    """Checkpoints kept besides the best one (by --eval.best_metric)."""
    low_disk: Literal["warn", "stop"] = "warn"
    """Free disk below the last checkpoint's size: warn and train on unsaved, or save nothing and stop."""
    is_keep_training: bool | Literal["auto"] = False
    """Resume from output_dir's newest complete checkpoint: true, false (a fresh run), or auto (resume if there is one)."""
    overwrite_output_dir: bool = False
    """Start fresh although output_dir holds a run: that run is moved aside into output_dir/previous_runs/, not deleted."""
    freeze: list[str] = field(default_factory=list)
    """Parts not trained (no gradient, no optimizer state): module name globs or embeddings, encoder, decoder; e.g. embeddings,encoder (the prior art's fine-tuning)."""
    is_finetune: bool = False
    """Start from the model in finetune_from with a fresh optimizer and schedule (the prior art's name for --model.name_or_path)."""
    allow_batch_change: bool = False
    """On resume, accept a global batch different from the checkpoint's (position rounded down to it)."""
    finetune_from: str = ""
    """Model folder (save_pretrained format) is_finetune starts from (default: output_dir/final)."""
    force: bool = False
    """Train even when the pre-flight memory estimate says the run will not fit."""
    peer_timeout_seconds: float = 30.0
    """Seconds without a sign of life from another rank before this one ends (exit code 5) instead of hanging."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (0 = all epochs); the LR schedule still spans all epochs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: AdapterConfig = field(default_factory=AdapterConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def validate(self) -> "RunConfig":
        """Every check of the tree, in one place. Raises ConfigError naming the option."""
        positive = {
            "epochs": self.epochs,
            "batch_size_per_gpu": self.batch_size_per_gpu,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "max_seq_len": self.max_seq_len,
            "logging_steps": self.logging_steps,
            "save_steps": self.save_steps,
            "model.d_model": self.model.d_model,
            "model.num_layers": self.model.num_layers,
            "model.num_heads": self.model.num_heads,
            "model.d_ff": self.model.d_ff,
            "data.shuffle_buffer": self.data.shuffle_buffer,
            "data.prefetch_factor": self.data.prefetch_factor,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"--{name} must be at least 1 (got {value})")
        non_negative = {
            "keep_latest_n_ckp": self.keep_latest_n_ckp,
            "eval_steps": self.eval_steps,
            "patience": self.patience,
            "max_steps": self.max_steps,
            "cpu_threads": self.cpu_threads,
            "lora.r": self.lora.r,
            "data.num_workers": self.data.num_workers,
            "data.eval_max_samples": self.data.eval_max_samples,
            "model.num_decoder_layers": self.model.num_decoder_layers,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"--{name} must be 0 or more (got {value})")
        if not self.peer_timeout_seconds >= 5:
            raise ConfigError(f"--peer_timeout_seconds must be at least 5 (got {self.peer_timeout_seconds})")
        if not self.log_every_seconds > 0:
            raise ConfigError(f"--log_every_seconds must be positive (got {self.log_every_seconds})")
        if not self.learn_rate > 0:
            raise ConfigError(f"--learn_rate must be positive (got {self.learn_rate})")
        if self.div_factor < 1:
            raise ConfigError(f"--div_factor must be at least 1 (got {self.div_factor})")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")
        if not 0 <= self.final_lr_ratio <= 1:
            raise ConfigError(f"--final_lr_ratio must be in [0, 1] (got {self.final_lr_ratio})")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ConfigError("--max_grad_norm and --weight_decay must be 0 or more")
        if self.model.dropout is not None and not 0 <= self.model.dropout < 1:
            raise ConfigError(f"--model.dropout must be in [0, 1) (got {self.model.dropout})")
        if self.model.d_model % self.model.num_heads:
            raise ConfigError(
                f"--model.d_model ({self.model.d_model}) must be divisible by --model.num_heads ({self.model.num_heads})"
            )
        from lowmem_train.model import families  # file names only: nothing of a family is imported here

        if self.model.type not in families.names():
            raise ConfigError(f"invalid value {self.model.type!r} for --model.type; choose one of "
                              f"{', '.join(families.names())}")
        if self.model.type == "t5" and self.model.num_decoder_layers < 1:
            raise ConfigError("--model.num_decoder_layers must be at least 1 for a t5 model")
        if self.model.vocab_size < 16:
            raise ConfigError(f"--model.vocab_size must be at least 16 (got {self.model.vocab_size})")
        if not self.train_file:
            raise ConfigError("--train_file is empty: name a parquet file, folder or glob")
        if not self.output_dir:
            raise ConfigError("--output_dir is empty: name the run folder")
        if self.is_keep_training is True and self.is_finetune:
            raise ConfigError("--is_keep_training=True and --is_finetune exclude each other: resume a run or start a "
                              "new one (auto resumes a fine-tuning run's own checkpoints)")
        if self.is_keep_training is not False and self.overwrite_output_dir:
            raise ConfigError("--overwrite_output_dir starts a fresh run; it cannot be combined with "
                              f"--is_keep_training={self.is_keep_training}")
        if self.lora.r and not self.lora.alpha > 0:
            raise ConfigError(f"--lora.alpha must be positive (got {self.lora.alpha})")
        if not 0 <= self.lora.dropout < 1:
            raise ConfigError(f"--lora.dropout must be in [0, 1) (got {self.lora.dropout})")
        from lowmem_train.trainer.metrics import METRICS  # names only: the libraries load when a metric is used

        unknown = [m for m in self.eval.metrics if m not in METRICS]
        if unknown:
            raise ConfigError(f"--eval.metrics: unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
        if self.eval.best_metric != "loss" and self.eval.best_metric not in self.eval.metrics:
            raise ConfigError(f"--eval.best_metric={self.eval.best_metric}: choose loss or one of --eval.metrics "
                              f"({', '.join(self.eval.metrics) or 'none'})")
        if self.eval.best_metric != "loss" and not self.eval.generate:
            raise ConfigError(f"--eval.best_metric={self.eval.best_metric} scores generated answers: it needs "
                              "--eval.generate=true (or --eval.best_metric=loss)")
        self.memory.validate()
        return self
