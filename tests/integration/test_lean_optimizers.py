"""Lean optimizers (trainer/optim.py, model/adapt.py): Adafactor, frozen parts and LoRA adapters train, resume
exactly, keep what is frozen to the bit, refuse what they cannot do in one line, and a LoRA run exports to a plain
model that answers through transformers as the run's own evaluation did."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, TINY_MODEL, accelerate_launch, metric_records, run_cli, task_options
from tests.integration.test_plain_transformers import SEEN, UNSEEN, plain_calls, write_rows
from tests.pretrained_folders import make

pytestmark = pytest.mark.slow
RECORDER = REPO / "tests" / "integration" / "scripts" / "record_run.py"
BASE = [*TINY_MODEL, "--batch_size_per_gpu=16", "--save_steps=2", "--data.eval_max_samples=8", "--logging_steps=1",
        "--model.dropout=0.0"]


def recorded(tiny_task, out: Path, *extra: str, launcher: list[str] | None = None) -> dict:
    run = subprocess.run([*(launcher or [sys.executable]), str(RECORDER), *task_options(tiny_task, out), *BASE,
                          *extra], cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 0, run.stderr[-3000:]
    return {**torch.load(out / "record_rank0.pt", weights_only=False), "log": run.stderr}


@pytest.mark.parametrize("option", ["--optimizer=adafactor", "--lora.r=4"])
def test_two_resumes_equal_an_uninterrupted_run(tiny_task, tmp_path, option):
    straight = recorded(tiny_task, tmp_path / "straight", option, "--max_steps=6")
    for steps in (2, 4, 6):
        resumed = recorded(tiny_task, tmp_path / "run", option, f"--max_steps={steps}",
                           *(["--is_keep_training=True"] if steps > 2 else []))
    assert resumed["losses"] == straight["losses"][4:6]
    assert resumed["weights"].keys() == straight["weights"].keys()
    assert all(torch.equal(resumed["weights"][k], straight["weights"][k]) for k in straight["weights"])
    if option.startswith("--lora"):  # its checkpoints hold the adapters (and their optimizer state) only
        from safetensors import safe_open

        checkpoint = tmp_path / "run" / "checkpoints" / "step_00000006"
        assert json.loads((checkpoint / "train_state.json").read_text())["trained_only"]
        with safe_open(str(checkpoint / "model" / "trained.safetensors"), "pt") as saved:
            names = list(saved.keys())
        assert names and all(".lora_A." in n or ".lora_B." in n for n in names), names


def test_frozen_parts_are_unchanged_to_the_bit_and_the_rest_trains(tiny_task, tmp_path):
    """--freeze embeddings,encoder (the prior art's fine-tuning): the shared embeddings, their tied head and the
    whole encoder keep their initial values exactly; the decoder moves."""
    from lowmem_train.config.loader import build_config
    from lowmem_train.model.build import build_model
    from lowmem_train.model.tokenizer import load_tokenizer

    run = recorded(tiny_task, tmp_path / "run", "--freeze=embeddings,encoder", "--max_steps=6")
    cfg = build_config(None, {**{o.split("=")[0][2:]: o.split("=")[1] for o in TINY_MODEL}, "model.dropout": "0.0",
                              "tokenizer_dir": str(tiny_task["tokenizer"])})
    model = build_model(cfg, load_tokenizer(tiny_task["tokenizer"]))  # the same seed: the same start
    initial = model.state_dict()
    frozen = [k for k in initial if k.startswith(("shared.", "encoder.", "lm_head."))]
    moved = [k for k in initial if k.startswith("decoder.block")]
    assert frozen and moved
    # The log says what is trained, each tied tensor counted once (the head is the shared embedding)
    n_frozen = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("shared.", "encoder.")))
    n_all = sum(p.numel() for p in model.parameters())
    assert (f"training {n_all - n_frozen:,} of {n_all:,} parameters (all but --freeze embeddings,encoder; "
            f"{n_frozen:,} frozen), optimizer adamw") in run["log"], run["log"][-3000:]
    assert all(torch.equal(run["weights"][k], initial[k]) for k in frozen)
    assert all(not torch.equal(run["weights"][k], initial[k]) for k in moved)


def test_adafactor_under_zero2_is_refused_in_one_line_on_two_processes(tiny_task, tmp_path, deepspeed_ops):
    launch = accelerate_launch("cpu_2proc_deepspeed.yaml", 29811)
    done = run_cli(["train", *task_options(tiny_task, tmp_path / "out"), *TINY_MODEL, "--optimizer=adafactor",
                    "--max_steps=2"], launcher=launch, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    # one line from the ranks (the launcher adds its own report of a failed child)
    assert done.returncode != 0 and len(errors) == 1 and not re.search(r"\[rank\d\]: Traceback", done.stderr), \
        done.stderr[-2000:]
    assert "--optimizer adafactor runs without DeepSpeed" in errors[0]
    assert json.loads((tmp_path / "out" / "exit_status.json").read_text())["exit_code"] == 2


def test_lora_trains_under_zero2_offload_on_two_processes_and_resumes_on_two_or_one(tiny_task, tmp_path,
                                                                                     deepspeed_ops):
    """LoRA adapters on two ranks, ZeRO-2 with the optimizer offloaded and the memory guard on (the defaults):
    trained, saved without the frozen base, resumed, the ranks still one model; and the same checkpoint resumed on
    one process (DeepSpeed's universal form, frozen base included) continues exactly as the two ranks did."""
    import shutil

    launch = accelerate_launch("cpu_2proc_deepspeed.yaml", 29812)
    first = recorded(tiny_task, tmp_path / "run", "--lora.r=4", "--max_steps=4", launcher=launch)
    shutil.copytree(tmp_path / "run", tmp_path / "run_on_one")
    again = recorded(tiny_task, tmp_path / "run", "--lora.r=4", "--max_steps=6", "--is_keep_training=True",
                     launcher=accelerate_launch("cpu_2proc_deepspeed.yaml", 29813))
    assert [s for s, _ in again["losses"]] == [4, 5] and first["losses"][0][1] > again["losses"][-1][1] * 0.5
    rank1 = torch.load(tmp_path / "run" / "record_rank1.pt", weights_only=False)
    lora = [k for k in again["weights"] if "lora_B" in k]
    assert lora and all(torch.equal(again["weights"][k], rank1["weights"][k]) for k in lora)
    assert any(again["weights"][k].abs().sum() > 0 for k in lora)  # B starts at zero: it trained
    on_one = recorded(tiny_task, tmp_path / "run_on_one", "--lora.r=4", "--max_steps=6", "--is_keep_training=True",
                      launcher=accelerate_launch("cpu_2proc_deepspeed.yaml", 29814) + ["--num_processes", "1"])
    assert "loading its universal form on 1" in on_one["log"] and "global batch 32 kept" in on_one["log"]
    assert [s for s, _ in on_one["losses"]] == [4, 5]
    assert max(abs(a - b) for (_, a), (_, b) in zip(on_one["losses"], again["losses"])) < 1e-6
    assert max((on_one["weights"][k] - again["weights"][k]).abs().max().item() for k in lora) < 1e-6


def test_a_lora_run_exports_a_merged_model_that_answers_as_its_evaluation_did(tmp_path):
    """LoRA r=8 on a pretrained T5 folder, learning 16 numbers; the export merges the adapters into a plain T5
    (the same plain-transformers calls as every export), and --adapter_only writes peft's adapter folder."""
    folder = make("t5", tmp_path / "t5")
    train = write_rows(tmp_path / "train.parquet", SEEN, repeat=32)
    held = write_rows(tmp_path / "held.parquet", SEEN + UNSEEN)
    out = tmp_path / "run"
    done = run_cli(["train", f"--model.name_or_path={folder}", f"--train_file={train}", f"--validation_file={held}",
                    f"--output_dir={out}", "--lora.r=8", "--lora.alpha=32", "--epochs=6", "--learn_rate=2e-2",
                    "--batch_size_per_gpu=32", "--model.dropout=0.0", "--seed=5"], timeout=900,
                   env={"PYTHONWARNINGS": "default"})  # Python's own filters: what a user's terminal shows
    assert done.returncode == 0, done.stderr[-3000:]
    assert "is_gradient_checkpointing" not in done.stderr  # peft's deprecation noise stays out of the log
    own = metric_records(out, "eval")[-1]
    plain = plain_calls(out / "final", held, tmp_path)
    assert plain["project_modules"] == [] and 0 < own["exact_match"] < 1, own
    assert plain["hits"] == round(own["exact_match"] * 32), (plain, own)
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["T5ForConditionalGeneration"]  # plain, no adapter left
    adapter = tmp_path / "adapter"
    assert run_cli(["export", f"--checkpoint={out}", f"--output={adapter}", "--adapter_only"]).returncode == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    check = ("import sys, torch; from peft import PeftModel; from transformers import AutoModelForSeq2SeqLM as M; "
             "a = PeftModel.from_pretrained(M.from_pretrained(sys.argv[1]), sys.argv[2]).eval(); "
             "b = M.from_pretrained(sys.argv[3]).eval(); ids = torch.tensor([[5, 6, 7, 1]]); "
             "print(float((a(input_ids=ids, decoder_input_ids=ids).logits - "
             "b(input_ids=ids, decoder_input_ids=ids).logits).abs().max()))")
    same = subprocess.run([sys.executable, "-c", check, str(folder), str(adapter), str(out / "final")],
                          capture_output=True, text=True, timeout=300)
    assert same.returncode == 0 and float(same.stdout.split()[-1]) < 1e-4, same.stderr[-2000:]
