"""The benchmarks' command lines still mean what their tables say: bench/peers.py gives lowmem-train and the peers
the same configuration, and bench/optimizer_memory.py's runs use the optimizer and trained parts they are named for.
A renamed or retyped product option would otherwise surface only after minutes of benchmarking, or not at all
(a silently ignored override would compare the wrong things)."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import pytest

from bench import optimizer_memory, peers
from bench.peer_loops import PRESETS, base_config
from lowmem_train.config.cli import OneLineParser, add_run_config_options, parse_run_config


def dotted(cfg, name: str):
    return functools.reduce(getattr, name.split("."), cfg)


def cli_config(options: list[str]):
    parser = OneLineParser()
    add_run_config_options(parser)
    return parse_run_config(parser, options)[0]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_lowmem_options_equal_the_peers_config(preset, tmp_path):
    data = tmp_path / "data"
    paths = [f"--train_file={data / 'train.parquet'}", "--validation_file=", f"--tokenizer_dir={data / 'tokenizer'}"]
    lowmem = cli_config([*peers.preset_options(preset), *paths])
    peer = base_config(data, *PRESETS[preset])
    for field in ("batch_size_per_gpu", "gradient_accumulation_steps", "learn_rate", "max_seq_len", "model",
                  "data.num_workers", "optimizer"):
        assert dotted(lowmem, field) == dotted(peer, field), field
    if preset == "t5_small":
        assert (lowmem.batch_size_per_gpu, lowmem.gradient_accumulation_steps, lowmem.model.dropout) == (32, 1, 0.0)
        assert lowmem.model.d_model == 512


def test_optimizer_memory_runs_are_what_they_are_named(tmp_path):
    args = optimizer_memory.parse(["--quick", "--work", str(tmp_path)])
    assert (args.steps, args.rounds, args.names) == (8, 1, list(optimizer_memory.CONFIGS))
    cfgs = {}
    for name, (_, extra) in optimizer_memory.CONFIGS.items():
        options = optimizer_memory.options(args, Path(tmp_path), tmp_path / name, extra)
        cfgs[name] = cli_config(options)
    assert all(c.batch_size_per_gpu == 16 and c.gradient_accumulation_steps == 2 and c.max_steps == 8
               and c.data.num_workers == 0 for c in cfgs.values())
    assert [c.optimizer for c in cfgs.values()] == ["adamw", "adafactor", "adamw", "adamw"]
    assert cfgs["freeze"].freeze == ["embeddings", "encoder"] and cfgs["lora"].lora.r == 8
    assert not cfgs["adamw"].freeze and not cfgs["adamw"].lora.r


def test_optimizer_memory_refuses_an_unknown_configuration(capsys):
    with pytest.raises(SystemExit):
        optimizer_memory.parse(["--only", "adamw,sgd"])
    assert "sgd" in capsys.readouterr().err
    assert isinstance(optimizer_memory.parse(["--only", "lora"]), argparse.Namespace)
