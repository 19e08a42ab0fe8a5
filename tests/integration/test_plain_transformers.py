"""A trained model answers when called the way every transformers user calls it, with no project code.

The run's final/ folder is loaded in a fresh interpreter by tests/integration/scripts/plain_calls.py:
AutoTokenizer, AutoModelFor..., `tok(prompt, return_tensors="pt")`, `model.generate(**inputs)`,
`tok.decode(..., skip_special_tokens=True)`, and `pipeline("text-generation")` for the causal family. Its exact
match on the held-out split must equal the run's own evaluation of the same rows: the exported tokenizer lays
prompts out as training did, and generation_config holds what generate needs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, TINY_MODEL, metric_records, run_cli

pytestmark = pytest.mark.slow
PLAIN = REPO / "tests" / "integration" / "scripts" / "plain_calls.py"
# Learned by heart in a couple of hundred steps; scored together with as many numbers never seen, so that the
# scores hold hits and misses. One or more of each case.
SEEN = [7, 42, 305, 1234, 1200, 10010, 20240101, 56789, 90000, 3004, 120034, 88, 1000001, 6060, 777, 15]
UNSEEN = [8, 43, 306, 1235, 1300, 10020, 20240102, 56788, 80000, 3005, 120035, 89, 1000002, 6070, 778, 16]


def write_rows(path, numbers: list[int], repeat: int = 1):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lowmem_train.trainer.data.zh_numerals import number_case, to_chinese

    numbers = numbers * repeat
    pq.write_table(pa.table({"prompt": [str(n) for n in numbers], "response": [to_chinese(n) for n in numbers],
                             "case": [number_case(n) for n in numbers]}), path, row_group_size=256)
    return path


def plain_calls(model, rows, cwd, *extra: str) -> dict:
    run = subprocess.run([sys.executable, str(PLAIN), str(model), str(rows), *extra], cwd=cwd, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family, extra", [("t5", ["--epochs=12", "--learn_rate=1e-2"]),
                                           ("gpt", ["--config=gpt_tiny", "--epochs=12", "--learn_rate=1e-2"])])
def test_plain_calls_score_what_the_run_scored(tiny_task, tmp_path, family, extra):
    out = tmp_path / "run"
    train = write_rows(tmp_path / "train.parquet", SEEN, repeat=32)
    held = write_rows(tmp_path / "scored.parquet", SEEN + UNSEEN)
    result = run_cli(["train", f"--train_file={train}", f"--validation_file={held}",
                      f"--tokenizer_dir={tiny_task['tokenizer']}", f"--output_dir={out}", *TINY_MODEL, *extra,
                      "--batch_size_per_gpu=32", "--seed=5", "--logging_steps=50"], timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = metric_records(out, "eval")
    own = evals[-1]
    assert own["samples"] == 32 and "zero after 万/亿" in result.stderr.splitlines()[-1]  # per case in the last line

    plain = plain_calls(out / "final", held, tmp_path, *(["--pipeline"] if family == "gpt" else []))
    assert plain["project_modules"] == []
    assert plain["rows"] == 32
    assert 0.4 < own["exact_match"] < 1, own  # hits (the numbers learned) and misses: equal scores mean something
    assert plain["hits"] == round(own["exact_match"] * 32), (plain, own)
    for case, share in plain["by_case"].items():  # per case too: the run logged each case's exact match
        assert abs(share - own[f"exact_match/{case}"]) < 1e-9, (case, plain["by_case"], own)
    if family == "gpt":  # the pipeline sends the bare prompt (no special tokens): the model ends it itself.
        # That is one more generated token, whose float sums (and the thread count behind them) can tip a near
        # tie among the unsure held-out answers: one row of 32 either way, seen once in ~10 runs. A pipeline
        # that lost the layout scores near 0.
        assert abs(plain["pipeline_hits"] - plain["hits"]) <= 1, plain
