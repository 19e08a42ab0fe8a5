"""Bring your own model: a user's save_pretrained folder with its own tokenizer (tests/pretrained_folders.py: T5,
T5 v1.1 with its own head, GPT-2 with a pad-less byte-level BPE, Llama) trains from its own weights in its own
layout, resumes exactly, and exports to a folder from which plain transformers calls answer as the run's own
evaluation did. Nothing is written into the user's folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import REPO, metric_records, run_cli
from tests.integration.test_plain_transformers import SEEN, UNSEEN, plain_calls, write_rows
from tests.pretrained_folders import KINDS, make, tree_digest

pytestmark = pytest.mark.slow
RECORDER = REPO / "tests" / "integration" / "scripts" / "record_run.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("byom_data")
    return {"first": write_rows(root / "first.parquet", SEEN, repeat=2),  # 32 rows: one step of 32 holds them all
            "train": write_rows(root / "train.parquet", SEEN, repeat=32),
            "held": write_rows(root / "held.parquet", SEEN + UNSEEN)}


def recorded(folder: Path, out: Path, train: Path, held: Path, *extra: str) -> dict:
    args = [f"--model.name_or_path={folder}", f"--train_file={train}", f"--validation_file={held}",
            f"--output_dir={out}", "--batch_size_per_gpu=32", "--model.dropout=0.0", "--seed=5", "--logging_steps=50",
            "--save_steps=1000", *extra]
    run = subprocess.run([sys.executable, str(RECORDER), *args], cwd=REPO, capture_output=True, text=True,
                         timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out / "record_rank0.pt", weights_only=False)


def plain_loss(folder: Path, rows: Path) -> float:
    """The mean token loss of these rows as a transformers user computes it with the folder's own tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    table = pq.read_table(rows)
    prompts, responses = table["prompt"].to_pylist(), table["response"].to_pylist()
    tok = AutoTokenizer.from_pretrained(folder)
    if AutoConfig.from_pretrained(folder).is_encoder_decoder:
        model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
        inputs = tok(prompts, padding=True, return_tensors="pt")  # its post-processor appends </s>
        labels = tok(text_target=responses, padding=True, return_tensors="pt")["input_ids"]
        labels[labels == tok.pad_token_id] = -100
        with torch.no_grad():
            return float(model(**inputs, labels=labels).loss)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    end = tok.eos_token_id  # no separator in these tokenizers: the end of sequence ends the prompt too
    start = [tok.bos_token_id] if tok.bos_token_id is not None and tok.bos_token_id != end else []
    rows_ids, rows_labels = [], []
    for prompt, response in zip(prompts, responses):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        target = [end] + tok(response, add_special_tokens=False)["input_ids"] + [end]
        rows_ids.append(start + p + target)
        rows_labels.append([-100] * (len(start) + len(p)) + target)
    width = max(map(len, rows_ids))
    ids = torch.tensor([r + [end] * (width - len(r)) for r in rows_ids])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows_labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows_ids])
    with torch.no_grad():
        return float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


@pytest.mark.parametrize("kind", KINDS)
def test_a_pretrained_folder_trains_from_its_own_weights_resumes_exactly_and_exports(kind, data, tmp_path):
    folder = make(kind, tmp_path / kind)
    before = tree_digest(folder)
    # 1. The first step's loss is the plain model's loss on the same rows: the user's weights, the user's layout.
    first = recorded(folder, tmp_path / "first", data["first"], data["held"], "--max_steps=1")
    assert abs(first["losses"][0][1] - plain_loss(folder, data["first"])) < 1e-5, first["losses"]
    # 2. It learns: 5 epochs of 16 numbers; scored on them and as many unseen ones.
    straight = recorded(folder, tmp_path / "straight", data["train"], data["held"], "--epochs=5",
                        "--learn_rate=1e-2")
    losses = [loss for _, loss in straight["losses"]]
    assert losses[-1] < 0.5 * losses[0], losses[::20]
    # 3. Two starts (3 steps, then --is_keep_training) make the same first 6 steps as one run, to the bit.
    recorded(folder, tmp_path / "twice", data["train"], data["held"], "--epochs=5", "--learn_rate=1e-2",
             "--max_steps=3")
    resumed = recorded(folder, tmp_path / "twice", data["train"], data["held"], "--epochs=5", "--learn_rate=1e-2",
                       "--max_steps=6", "--is_keep_training=True")
    assert resumed["losses"] == straight["losses"][3:6]
    # 4. The exported folder answers through plain transformers calls as the run's evaluation scored.
    own = metric_records(tmp_path / "straight", "eval")[-1]
    plain = plain_calls(tmp_path / "straight" / "final", data["held"], tmp_path)
    assert plain["project_modules"] == [] and plain["rows"] == 32
    assert 0 < own["exact_match"] < 1, own  # hits and misses: equal scores mean something
    assert plain["hits"] == round(own["exact_match"] * 32), (plain, own)
    assert tree_digest(folder) == before  # nothing written into the user's folder


def test_a_folder_with_only_a_sentencepiece_model_is_converted_in_memory(data, tmp_path):
    folder = make("t5_spiece", tmp_path / "t5_spiece")
    before = tree_digest(folder)
    result = run_cli(["train", f"--model.name_or_path={folder}", f"--train_file={data['first']}",
                      f"--validation_file={data['held']}", f"--output_dir={tmp_path / 'out'}", "--max_steps=2",
                      "--batch_size_per_gpu=16"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert tree_digest(folder) == before  # converted in memory, never written next to the user's files
    from transformers import AutoTokenizer, T5Tokenizer

    exported = AutoTokenizer.from_pretrained(tmp_path / "out" / "final")
    original = T5Tokenizer.from_pretrained(folder)
    assert exported.get_vocab() == original.get_vocab()  # the user's vocabulary and ids, exactly
    assert exported("12345")["input_ids"] == original("12345")["input_ids"]
