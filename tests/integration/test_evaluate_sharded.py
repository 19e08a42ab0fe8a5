"""Validation covers the whole split, sharded across ranks and summed (README's guarantees table;
trainer/evaluate.py): the trainer's Evaluator on 2 real processes (`accelerate launch`, gloo) scores every row
exactly once and reports the loss and exact match of 1 process.

37 rows, batches of 4: 37 is not a multiple of 2 processes x 4, so one rank runs short and pads. Every row has
its own `case`, so the per-case counts the evaluator sums over ranks say, row by row, how often it was scored
and whether its answer was right. A tiny GPT that memorised 4 numbers answers those rows right and most
others wrong, so the exact match is neither 0 nor 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from tests.integration.conftest import MEMORISED

pytestmark = pytest.mark.slow
SCRIPT = REPO / "tests" / "integration" / "scripts" / "evaluate_once.py"
ROWS, BATCH = 37, 4


@pytest.fixture(scope="module")
def validation_37(tiny_task, tmp_path_factory) -> Path:
    """Every 4th row a memorised number, the others held-out numbers of the bundled task; case = row name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lowmem_train.trainer.data.zh_numerals import to_chinese

    held_out = pq.read_table(tiny_task["validation"]).to_pylist()
    rows = []
    for i in range(ROWS):
        if i % 4 == 0:
            n = MEMORISED[(i // 4) % len(MEMORISED)]
            rows.append((str(n), to_chinese(n)))
        else:
            rows.append((held_out[i]["prompt"], held_out[i]["response"]))
    path = tmp_path_factory.mktemp("validation_37") / "validation.parquet"
    pq.write_table(pa.table({"prompt": [p for p, _ in rows], "response": [r for _, r in rows],
                             "case": [f"row{i:02d}" for i in range(ROWS)]}), path, row_group_size=16)
    return path


def evaluate(model: Path, validation: Path, tokenizer: Path, out: Path, launcher: list[str] | None = None) -> list:
    run = subprocess.run([*(launcher or [sys.executable]), str(SCRIPT), f"--model={model}",
                          f"--validation_file={validation}", f"--tokenizer_dir={tokenizer}", f"--batch_size={BATCH}",
                          f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 0, run.stderr[-4000:]
    records = sorted((torch.load(p, weights_only=False) for p in out.parent.glob(f"{out.name}.rank*.pt")),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in records] == list(range(records[0]["world_size"]))
    return records


def test_two_ranks_score_every_row_once_and_agree_with_one_process(memorised_gpt, validation_37, tiny_task, tmp_path):
    (one,) = evaluate(memorised_gpt, validation_37, tiny_task["tokenizer"], tmp_path / "one")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", "29791"]
    two = evaluate(memorised_gpt, validation_37, tiny_task["tokenizer"], tmp_path / "two", launcher)
    every_row = {f"row{i:02d}" for i in range(ROWS)}

    # One process: the whole split, each row once; the memorised rows right, most others wrong.
    assert one["samples"] == ROWS and set(one["by_case"]) == every_row
    assert all(scored == 1 for _, scored in one["by_case"].values())
    right = {case for case, (correct, _) in one["by_case"].items() if correct}
    assert {f"row{i:02d}" for i in range(0, ROWS, 4)} <= right and len(right) < ROWS - 10, sorted(right)
    assert one["exact_match"] == pytest.approx(len(right) / ROWS)

    # Two processes: disjoint shards that together are the split; both ranks run the same number of batches.
    assert len(two) == 2 and all(r["world_size"] == 2 for r in two)
    shards = [set(r["real_rows"]) for r in two]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == every_row
    assert sorted(len(s) for s in shards) == [18, 19] and two[0]["batches"] == two[1]["batches"] == 5

    # Summed over ranks (every rank reports the same totals): each row scored exactly once, the same verdict
    # per row, and the 1-process exact match and loss. Row lengths differ, so the loss is a token-weighted
    # mean: a rank mean of rank means, or a padding row counted, would show here.
    for rank in two:
        assert rank["by_case"] == one["by_case"]
        assert rank["samples"] == ROWS
        assert rank["exact_match"] == one["exact_match"]
        assert rank["loss"] == pytest.approx(one["loss"], rel=1e-5)
    # BLEU from statistics summed over the ranks is sacrebleu's corpus BLEU of all the ranks' answers. (Not always
    # one process's: a batch of other rows pads differently, and a doubtful greedy token may then differ.)
    import sacrebleu

    for run in (one, two[0]):
        pairs = one["answers"] if run is one else two[0]["answers"] + two[1]["answers"]
        corpus = sacrebleu.corpus_bleu([a for _, a in pairs], [[r for r, _ in pairs]], tokenize="zh").score
        assert len(pairs) == ROWS and run["scores"]["bleu"] == pytest.approx(corpus, abs=0.01), (run["scores"], corpus)
    assert two[0]["scores"] == two[1]["scores"] and 0 < one["scores"]["bleu"] < 100, one["scores"]
