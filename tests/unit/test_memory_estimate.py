"""The pre-flight estimate: parameter counts by hand, activations against torch's saved tensors, the refusal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowmem_train.config.loader import build_config
from lowmem_train.config.errors import ConfigError
from lowmem_train.trainer.memory.activations import activation_bytes_per_sample
from lowmem_train.trainer.memory.estimate import Capacity, check_fits, recommend
from lowmem_train.trainer.memory.footprint import Engine, estimate_for_plan, model_shape, state_bytes
from lowmem_train.trainer.memory.policy import Plan
from lowmem_train.trainer.memory.probe import PAGE_SIZE, MemoryProbe
from lowmem_train.trainer.memory.units import GB, GpuReading

REPO = Path(__file__).resolve().parents[2]
TINY = {"model.d_model": 64, "model.d_ff": 128, "model.num_heads": 2, "model.num_layers": 2,
        "model.num_decoder_layers": 3, "model.vocab_size": 100}


def no_tokenizer(tmp_path: Path, **extra) -> dict:
    return {**TINY, "tokenizer_dir": str(tmp_path / "none"), **extra}


def t5_by_hand(d: int, f: int, heads: int, enc: int, dec: int, vocab: int, buckets: int = 32) -> int:
    attention = 4 * d * d  # q, k, v, o without biases (d_kv = d / heads)
    encoder = enc * (attention + 2 * d * f + 2 * d) + buckets * heads + d  # + relative bias of layer 0, final norm
    decoder = dec * (2 * attention + 2 * d * f + 3 * d) + buckets * heads + d
    return vocab * d + encoder + decoder  # lm_head is tied to the embedding


def gpt2_by_hand(d: int, f: int, layers: int, vocab: int, positions: int) -> int:
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * f + f) + (f * d + d)
    return vocab * d + positions * d + layers * block + 2 * d


def test_t5_parameters_match_the_hand_count(tmp_path):
    cfg = build_config(None, no_tokenizer(tmp_path))
    shape = model_shape(cfg)
    assert shape.params == t5_by_hand(64, 128, 2, 2, 3, 100)
    assert shape.vocab == 100 and "vocab_size" in shape.vocab_source
    assert shape.largest_layer == max(100 * 64, 64 * 128)  # the embedding or one feed-forward matrix


def test_gpt_parameters_match_the_hand_count(tmp_path):
    cfg = build_config(None, no_tokenizer(tmp_path, **{"model.type": "gpt", "max_seq_len": 48}))
    assert model_shape(cfg).params == gpt2_by_hand(64, 128, 2, 100, 48)


def test_vocabulary_comes_from_the_tokenizer_when_there_is_one(tiny_task):
    cfg = build_config(None, {**TINY, "tokenizer_dir": str(tiny_task["tokenizer"])})
    from lowmem_train.model.tokenizer import load_tokenizer

    assert model_shape(cfg).vocab == len(load_tokenizer(tiny_task["tokenizer"]))


def saved_bytes_per_sample(cfg, vocab: int, batch: int = 2) -> float:
    """What autograd really keeps: storages packed by saved_tensors_hooks, parameters excluded."""
    from lowmem_train.model import families
    from lowmem_train.model.adapt import prepare_trained
    from lowmem_train.model.build import build_model

    class VocabOnly:
        pad_token_id, eos_token_id, bos_token_id = 0, 1, 3

        def __len__(self) -> int:
            return vocab

    model = prepare_trained(build_model(cfg, VocabOnly()), cfg, families.get(cfg.model.type)).train()  # --freeze
    ids = torch.randint(5, vocab, (batch, cfg.max_seq_len))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        extra = {"decoder_input_ids": ids} if cfg.model.type == "t5" else {}
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **extra).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, vocab).float(), ids.reshape(-1))
    return sum(v for k, v in kept.items() if k not in params) / batch


@pytest.mark.parametrize("overrides", [
    {"model.type": "t5", "model.dropout": 0.1},
    {"model.type": "t5", "model.dropout": 0.0, "max_seq_len": 48},
    {"model.type": "gpt", "model.dropout": 0.1, "model.attn_implementation": "eager"},
    {"model.type": "gpt", "model.dropout": 0.0, "model.d_ff": 256},
    {"model.type": "llama", "model.dropout": 0.0},
    {"model.type": "llama", "model.dropout": 0.1, "max_seq_len": 48},
    {"model.type": "llama", "model.dropout": 0.0, "model.attn_implementation": "eager", "model.d_ff": 256},
    # frozen layers in front keep nothing (the estimate skips them). A frozen layer behind a trained one (T5's
    # encoder with its embeddings trained) keeps less than a trained one; the estimate counts it in full (~1.25x high)
    {"model.type": "t5", "model.dropout": 0.0, "model.num_layers": 4, "freeze": "embeddings,encoder"},
    {"model.type": "t5", "model.dropout": 0.1, "model.num_layers": 4, "freeze": "embeddings,encoder"},
    {"model.type": "gpt", "model.dropout": 0.0, "model.num_layers": 4, "freeze": "embeddings,transformer.h.0,transformer.h.1"},
    {"model.type": "llama", "model.dropout": 0.0, "model.num_layers": 4, "freeze": "model.embed_tokens,*.layers.0"},
])
def test_activations_match_what_autograd_keeps(overrides):
    from lowmem_train.trainer.memory.footprint import model_shape

    cfg = build_config(None, {**TINY, "model.d_model": 128, "model.num_heads": 4, "model.vocab_size": 100,
                              "tokenizer_dir": "/nonexistent", **overrides})
    vocab = 100
    measured = saved_bytes_per_sample(cfg, vocab)
    estimated = activation_bytes_per_sample(cfg, vocab, checkpointing=False, frozen_front=model_shape(cfg).frozen_front)
    assert 0.85 < estimated / measured < 1.2, (estimated, measured)


@pytest.mark.parametrize("kind", ["t5", "gpt", "llama"])
def test_checkpointing_keeps_layer_inputs_only(kind):
    cfg = build_config(None, {**TINY, "model.type": kind, "model.num_layers": 6, "model.num_decoder_layers": 6})
    full = activation_bytes_per_sample(cfg, 100, checkpointing=False)
    assert activation_bytes_per_sample(cfg, 100, checkpointing=True) < 0.5 * full
    shallow = build_config(None, {**TINY, "model.type": kind, "model.num_layers": 1, "model.num_decoder_layers": 1})
    assert (activation_bytes_per_sample(shallow, 100, checkpointing=True)
            <= activation_bytes_per_sample(shallow, 100, checkpointing=False))  # never worse than without


def engine(world: int, stage: int = 2, offload: bool = True, ds: bool = True) -> Engine:
    return Engine(Path("ds_configs/zero2_offload.json") if ds else None, stage if ds else 0, offload and ds, False,
                  "fp32", world, world, False)


def test_bytes_per_parameter_by_backend():
    plain = state_bytes(engine(1, ds=False), grad_accum=2)
    assert sum(p.per_param for p in plain) == 16  # fp32 weights + gradients + AdamW m, v
    zero2 = state_bytes(engine(2), grad_accum=2)
    # weights whole on each rank; gradient, master and moment partitions split 2 ways; the CPU accumulation buffer
    assert sum(p.per_param for p in zero2) == 4 + (4 + 4 + 8 + 4) / 2
    assert {p.where for p in zero2 if p.name != "weights"} == {"host"}
    assert sum(p.per_param for p in state_bytes(engine(2), grad_accum=1)) == 4 + 16 / 2


def test_a_worker_costs_the_same_whatever_the_model(tmp_path):
    """Workers start from a fork server, not from the trainer: they keep no copy of the model states, so a worker of
    a 0.2 B-parameter model costs what a worker of a 1 M one does (measured values: footprint.py)."""
    costs = []
    for preset in ("t5_tiny", "t5_base"):
        cfg = build_config(preset, {"tokenizer_dir": str(tmp_path / "none")})
        with_workers = estimate_for_plan(cfg, model_shape(cfg), engine(1, ds=False), Plan(16, 2, 2, False, 2, False))
        without = estimate_for_plan(cfg, model_shape(cfg), engine(1, ds=False), Plan(16, 2, 0, False, 2, False))
        costs.append(with_workers.host_node - without.host_node)
    assert costs[0] == costs[1] < 0.5 * 2**30


def fake_probe(root: Path, available_gb: float, pss_gb: float = 0.3) -> MemoryProbe:
    """The probe's /proc seam: a host with `available_gb` free, this process at `pss_gb`."""
    kb = lambda gb: int(gb * GB / 1024)  # noqa: E731
    for relative, text in {"proc/meminfo": f"MemTotal: {kb(32)} kB\nMemAvailable: {kb(available_gb)} kB\n",
                           "proc/vmstat": "pswpin 0\npswpout 0\n",
                           "proc/7/statm": f"1 {int(pss_gb * GB) // PAGE_SIZE} 0 0 0 0 0\n",
                           "proc/7/smaps_rollup": f"Pss: {kb(pss_gb)} kB\n"}.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return MemoryProbe(root=root, pid=7, environ={}, read_gpu=GpuReading)


def test_check_fits_refuses_in_one_line_and_force_skips(tmp_path):
    cfg = build_config("t5_small", {"tokenizer_dir": str(tmp_path / "none"), "deepspeed_config": "none"})
    with pytest.raises(ConfigError) as refused:
        check_fits(cfg, 1, probe=fake_probe(tmp_path, available_gb=1.0))
    line = str(refused.value)
    assert "\n" not in line and "needs" in line and "available" in line and "--force" in line, line
    assert "--batch_size_per_gpu=" in line or "--gradient_checkpointing" in line or "no plan fits" in line, line
    cfg.force = True
    report = check_fits(cfg, 1, probe=fake_probe(tmp_path, available_gb=1.0))
    assert not report.fits and "skipped (--force)" in report.line


def test_check_fits_counts_the_budget(tmp_path):
    cfg = build_config("t5_tiny", {"tokenizer_dir": str(tmp_path / "none"), "memory.host_budget_gb": 0.2})
    with pytest.raises(ConfigError, match="--memory.host_budget_gb"):
        check_fits(cfg, 1)
    cfg.memory.host_budget_gb = 16.0
    probe = MemoryProbe.from_config(cfg.memory)
    if probe.sample().host_available < 3 * GB:
        pytest.skip("this machine has too little free memory for the passing half")
    assert check_fits(cfg, 1, probe=probe).fits


def test_a_short_gpu_does_not_shed_the_loader_before_training(tmp_path):
    """Workers live in host RAM: when only the GPU estimate is short (--force past the refusal), shedding them
    before training buys nothing; the micro-batch is the guard's to decide from real samples."""
    from lowmem_train.trainer.memory.estimate import loader_steps_to_fit

    cfg = build_config("t5_small", {"tokenizer_dir": str(tmp_path / "none"), "data.num_workers": 4})
    gpu_engine = Engine(None, 0, False, False, "bf16", 1, 1, True)
    est = estimate_for_plan(cfg, model_shape(cfg), gpu_engine, Plan(16, 2, 4, True, 2, False))
    roomy_host_small_gpu = Capacity(est.host_node * 4, "test", gpu=est.gpu_rank // 2, limit=est.host_node * 8)
    assert loader_steps_to_fit(cfg, est, roomy_host_small_gpu) == (0, "")
    tight_host = Capacity(int(est.host_node * 0.9), "test", gpu=est.gpu_rank * 2, limit=est.host_node)
    assert loader_steps_to_fit(cfg, est, tight_host)[0] > 0


def test_recommendation_keeps_the_global_batch_and_fits(tmp_path):
    cfg = build_config("t5_small", {"tokenizer_dir": str(tmp_path / "none"), "data.num_workers": 4})
    shape, eng = model_shape(cfg), engine(1, ds=False)
    start = Plan(16, 2, 4, False, 2, False)
    now = estimate_for_plan(cfg, shape, eng, start)
    spare = cfg.memory.host_low_gb * GB
    cap = Capacity(int(now.host_node + spare - 1), "test", None)  # just short of fitting with the guard's spare
    better = recommend(cfg, now, cap)
    assert better is not None and better.host_node + spare <= cap.host
    assert better.plan.global_batch(1) == start.global_batch(1)
    assert better.plan.num_workers < 4 and better.plan.micro_batch == 16  # the loader is shed first
    assert recommend(cfg, now, Capacity(int(0.1 * GB), "test", None)) is None


def test_estimate_command_prints_every_section(tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    from train_low_mem import main

    assert main(["estimate", "--config", "t5_tiny", f"--tokenizer_dir={tmp_path / 'none'}", "--num_processes", "2"]) == 0
    out = capsys.readouterr().out
    for section in ("model", "engine", "bytes/param", "activations", "host RAM", "GPU memory", "available",
                    "plan now", "recommended"):
        assert f"\n{section}" in "\n" + out, (section, out)
    assert "ZeRO-2" in out and "2 process(es)" in out and "DeepSpeed's estimator" in out
    assert "\noptimizer    AdamW (m and v, 8 bytes per trained parameter)" in out, out


def test_estimate_of_a_pretrained_folder_follows_its_config_json_not_the_model_options(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from tests.pretrained_folders import make

    sys.path.insert(0, str(REPO))
    from train_low_mem import main

    folder = make("llama", tmp_path / "llama")
    plain = AutoModelForCausalLM.from_pretrained(str(folder))
    n, vocab = sum(p.numel() for p in plain.parameters()), plain.config.vocab_size
    capsys.readouterr()
    assert main(["estimate", f"--model.name_or_path={folder}", "--optimizer=adafactor"]) == 0
    lines = {line[:12].strip(): line[12:].lstrip() for line in capsys.readouterr().out.splitlines() if line[:1].strip()}
    assert lines["model"].startswith(f"llama, {n / 1e6:.2f}M parameters"), lines["model"]
    assert lines["model"].endswith(f"vocabulary {vocab} from {folder / 'config.json'}"), lines["model"]
    assert lines["optimizer"].startswith("transformers Adafactor (factored second moment"), lines["optimizer"]


def test_command_modules_import_nothing_heavy():
    code = ("import sys, lowmem_train.trainer.memory.estimate, lowmem_train.trainer.memory.report; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'transformers', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
