"""`export` and `generate` through the real CLI: a tiny model memorises a few numbers (one process, and two
DeepSpeed ZeRO-2 processes), its checkpoint is exported, loaded in a fresh process that imports nothing but
transformers and torch, and `generate` answers a trained number. Plus the user mistakes of both commands."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY_MODEL, accelerate_launch, memorisable_task, run_cli

NUMBERS = [7, 305, 1234, 10010]  # 12 epochs of these (96 steps) make a tiny model sure of each
ANSWERS = {"1234": "一千二百三十四", "10010": "一万零一十", "305": "三百零五"}

# Run in a fresh interpreter: what a user of the exported folder has, and no more.
FRESH_LOAD = r"""
import json, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
folder, prompt = sys.argv[1], sys.argv[2]
config = AutoConfig.from_pretrained(folder)
model_cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
model, info = model_cls.from_pretrained(folder, output_loading_info=True)
tok = AutoTokenizer.from_pretrained(folder)
end = tok.eos_token_id if config.is_encoder_decoder else tok.sep_token_id
ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"] + [end]])
with torch.no_grad():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
if not config.is_encoder_decoder:
    out = out[:, ids.shape[1]:]
print(json.dumps({"answer": tok.decode(out[0], skip_special_tokens=True), "missing": sorted(info["missing_keys"]),
                  "unexpected": sorted(info["unexpected_keys"]),
                  "project_modules": sorted(m for m in sys.modules if m.startswith("lowmem_train"))}))
"""


def fresh_answer(folder: Path, prompt: str, cwd: Path) -> dict:
    run = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(folder), prompt], cwd=cwd, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def train(tiny_task, root: Path, extra: list[str], launcher: list[str] | None = None) -> Path:
    """Memorise NUMBERS; no validation file, so that the time goes to training."""
    data = memorisable_task(root, NUMBERS)
    out = root / "run"
    result = run_cli(["train", f"--train_file={data}", "--validation_file=",
                      f"--tokenizer_dir={tiny_task['tokenizer']}", f"--output_dir={out}", *TINY_MODEL,
                      "--learn_rate=1e-2", "--seed=3", "--logging_steps=8", *extra],
                     launcher=launcher, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def export(checkpoint: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    result = run_cli(["export", f"--checkpoint={checkpoint}", f"--output={output}", *extra])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result


def generate(model: Path, *args: str) -> list[list[str]]:
    result = run_cli(["generate", f"--model={model}", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert all(line.count("\t") == 1 for line in lines), lines  # one `prompt<TAB>answer` per prompt
    return [line.split("\t") for line in lines]


def assert_same_weights(exported: Path, final: Path) -> None:
    """The export holds exactly the weights the run ended with (the run's own final/ is written at the same step)."""
    from safetensors.torch import load_file

    ours, theirs = load_file(exported / "model.safetensors"), load_file(final / "model.safetensors")
    assert set(ours) <= set(theirs)  # final/ may also list tied aliases; they are one tensor
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) == 0.0


@pytest.fixture(scope="module")
def t5_run(tiny_task, tmp_path_factory) -> Path:
    return train(tiny_task, tmp_path_factory.mktemp("t5"), ["--epochs=12", "--batch_size_per_gpu=32"])


@pytest.fixture(scope="module")
def t5_model(t5_run, tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("t5_export") / "model"
    export(t5_run / "checkpoints" / "latest", model)
    return model


@pytest.mark.slow
def test_t5_export_loads_without_project_code_and_generate_answers(t5_run, t5_model, tmp_path):
    loaded = fresh_answer(t5_model, "1234", cwd=tmp_path)
    assert loaded == {"answer": ANSWERS["1234"], "missing": [], "unexpected": [], "project_modules": []}
    assert_same_weights(t5_model, t5_run / "final")
    provenance = json.loads((t5_model / "lowmem_export.json").read_text())
    latest = t5_run / "checkpoints" / (t5_run / "checkpoints" / "latest").read_text().strip()
    assert provenance["weights"] == "safetensors" and provenance["checkpoint"] == str(latest.resolve())
    assert generate(t5_model, "--prompt=1234", "--prompt=10010") == [["1234", ANSWERS["1234"]],
                                                                    ["10010", ANSWERS["10010"]]]


@pytest.mark.slow
def test_every_strategy_and_a_prompts_file(t5_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("1234\n\n10010\n305\n", encoding="utf-8")
    expected = [[p, a] for p, a in ANSWERS.items()]
    # Batches of 2 over 3 prompts: order is kept across batches (greedy itself is covered above).
    beam = generate(t5_model, f"--prompts_file={prompts}", "--strategy=beam", "--num_beams=3", "--batch_size=2")
    assert beam == expected
    # Sampling among the single likeliest token is greedy decoding: the sampling path is wired up right.
    assert generate(t5_model, f"--prompts_file={prompts}", "--strategy=top_k", "--top_k=1") == expected
    sampled = [generate(t5_model, "--prompt=1234", "--prompt=99", "--strategy=top_p", "--top_p=0.95",
                        "--temperature=1.5", "--seed=5") for _ in range(2)]
    assert sampled[0] == sampled[1]  # same seed, same answers
    assert [p for p, _ in sampled[0]] == ["1234", "99"]


@pytest.mark.slow
def test_export_refuses_damaged_checkpoints_and_skips_them_in_a_run_folder(t5_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(t5_run / "checkpoints", run / "checkpoints")
    newest, older = sorted((run / "checkpoints").glob("step_*"), reverse=True)[:2]
    weights = newest / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated tensor file

    result = run_cli(["export", f"--checkpoint={newest}", f"--output={tmp_path / 'bad'}"])
    one_line_error(result, f"--checkpoint: {newest} is corrupt")
    assert not (tmp_path / "bad").exists()

    result = export(run, tmp_path / "good")  # a run folder: the newest intact checkpoint, with a warning
    assert f"skipping checkpoint {newest.name}" in result.stderr
    assert json.loads((tmp_path / "good" / "lowmem_export.json").read_text())["step"] == int(older.name[5:])

    # Right size, damaged bytes: passes the size check, caught when the weights are read.
    shutil.copy(t5_run / "checkpoints" / newest.name / "model" / "model.safetensors", weights)
    with open(weights, "r+b") as f:
        f.write(b"\xff" * 16)
    one_line_error(run_cli(["export", f"--checkpoint={newest}", f"--output={tmp_path / 'bad'}"]),
                   "cannot read the weights")


@pytest.mark.slow
def test_deepspeed_checkpoint_is_consolidated_and_answers(tiny_task, tmp_path, deepspeed_ops):
    """Two ranks, ZeRO-2 with CPU offload: the fp32 weights live in two optimizer shards; export joins them."""
    run = train(tiny_task, tmp_path, ["--epochs=12", "--batch_size_per_gpu=16"],
                launcher=accelerate_launch("cpu_2proc_deepspeed.yaml", 29711))
    ckpt_dir = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert len(list((ckpt_dir / "model" / "ds").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    model = tmp_path / "model"
    export(run, model)  # the run folder: its newest complete checkpoint
    assert json.loads((model / "lowmem_export.json").read_text())["weights"] == "deepspeed"
    assert_same_weights(model, run / "final")
    loaded = fresh_answer(model, "10010", cwd=tmp_path)
    assert loaded == {"answer": ANSWERS["10010"], "missing": [], "unexpected": [], "project_modules": []}
    assert generate(model, "--prompt=1234") == [["1234", ANSWERS["1234"]]]


@pytest.mark.slow
def test_gpt_export_and_generate(tiny_task, tmp_path):
    run = train(tiny_task, tmp_path, ["--config=gpt_tiny", "--epochs=12", "--batch_size_per_gpu=32"])
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    model = tmp_path / "model"
    export(ckpt, model)  # a checkpoint folder named directly
    loaded = fresh_answer(model, "1234", cwd=tmp_path)
    assert loaded == {"answer": ANSWERS["1234"], "missing": [], "unexpected": [], "project_modules": []}
    prompts = ["1234", "7", "10010", "305"]  # different lengths: left padding must not change an answer
    flags = [f"--prompt={p}" for p in prompts]
    batched, alone = generate(model, *flags), generate(model, *flags, "--batch_size=1")
    assert batched == alone
    assert [p for p, _ in batched] == prompts
    assert dict(batched)["1234"] == ANSWERS["1234"] and dict(batched)["10010"] == ANSWERS["10010"]
    assert all(a and not a.startswith(p) for p, a in batched)  # the continuation only, not the prompt again
    # More new tokens than the model has positions: cut to fit, with a warning, not an index error.
    result = run_cli(["generate", f"--model={model}", "--prompt=1234", "--max_new_tokens=500", "--strategy=beam"])
    assert result.returncode == 0 and "cut to fit" in result.stderr


def one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]


def fake_run(root: Path) -> Path:
    """A run folder whose only checkpoint never finished (no train_state.json), and a dangling `latest`."""
    (root / "run" / "checkpoints" / "step_00000010" / "model").mkdir(parents=True)
    (root / "run" / "checkpoints" / "latest").write_text("step_00000099\n")
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "notes.txt").write_text("keep me")
    (root / "empty.txt").write_text("\n\n")
    return root


@pytest.mark.parametrize("args, expected", [
    (["--checkpoint={r}/missing", "--output={r}/m"], "--checkpoint: {r}/missing does not exist"),
    (["--checkpoint={r}/run", "--output={r}/m"], "no complete checkpoint in {r}/run/checkpoints"),
    (["--checkpoint={r}/run/checkpoints/step_00000010", "--output={r}/m"], "is incomplete (no train_state.json"),
    (["--checkpoint={r}/run/checkpoints/latest", "--output={r}/m"], "names 'step_00000099', which is not a complete"),
    (["--checkpoint={r}/run", "--output={r}/not_a_model"], "exists and is not empty; pass --overwrite"),
    (["--checkpoint={r}/run", "--output={r}/not_a_model", "--overwrite"], "is not an exported model folder"),
    (["--output={r}/m"], "required: --checkpoint"),
])
def test_export_mistakes_end_in_one_line(tmp_path, args, expected):
    root = fake_run(tmp_path)
    result = run_cli(["export", *(a.format(r=root) for a in args)], timeout=300)
    one_line_error(result, expected.format(r=root))
    assert (root / "not_a_model" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("args, expected", [
    (["--model={r}/missing", "--prompt=12"], "--model: {r}/missing does not exist; export a checkpoint first"),
    (["--model={r}/not_a_model", "--prompt=12"], "holds no model (config.json + model.safetensors)"),
    (["--model={r}/run", "--prompt=12"], "is a training checkpoint or run folder, not a model; export it first"),
    (["--model={r}/not_a_model", "--prompt="], "--prompt #1 is empty"),
    (["--model={r}/not_a_model", "--prompts_file={r}/empty.txt"], "has no prompts"),
    (["--model={r}/not_a_model"], "no prompt given"),
    (["--model={r}/not_a_model", "--prompt=1", "--strategy=top_p", "--top_p=2"], "--top_p must be in (0, 1]"),
])
def test_generate_mistakes_end_in_one_line(tmp_path, args, expected):
    root = fake_run(tmp_path)
    one_line_error(run_cli(["generate", *(a.format(r=root) for a in args)], timeout=300), expected.format(r=root))
