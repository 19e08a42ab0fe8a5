"""A pretrained folder that cannot be trained is refused in one line naming the folder or flag (model/pretrained.py,
config/loader.py resolve_pretrained, model/tokenizer.py roles); nothing is downloaded, nothing written there."""

from __future__ import annotations

import time

import pytest

from lowmem_train.config.errors import ConfigError
from lowmem_train.config.loader import build_config
from tests.helpers import run_cli
from tests.pretrained_folders import make, tree_digest


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return make("gpt2", tmp_path_factory.mktemp("byom") / "gpt2")


def test_shape_comes_from_config_json(gpt2):
    cfg = build_config(None, {"model.name_or_path": str(gpt2)})
    assert (cfg.model.type, cfg.model.d_model, cfg.model.num_layers, cfg.model.num_heads) == ("gpt", 32, 2, 2)
    assert cfg.tokenizer_dir == str(gpt2) and cfg.model.dropout == 0.1  # its tokenizer and its own dropout


def test_shape_options_beside_a_pretrained_folder_are_refused_naming_where_they_came_from(gpt2):
    with pytest.raises(ConfigError, match=r"^--model.d_model cannot be combined with --model.name_or_path: the "
                                          r"model's family and shape come from .*config.json; drop it$"):
        build_config(None, {"model.name_or_path": str(gpt2), "model.d_model": "64"})
    with pytest.raises(ConfigError, match=r"--model.d_model \(set in .*t5_small.yaml\) cannot be combined"):
        build_config("t5_small", {"model.name_or_path": str(gpt2)})


def test_a_hub_name_is_not_a_folder_and_nothing_is_fetched(tmp_path):
    start = time.monotonic()
    with pytest.raises(ConfigError, match="google/flan-t5-small is not a folder .*looks like a Hugging Face Hub "
                                          "name: nothing is downloaded"):
        build_config(None, {"model.name_or_path": "google/flan-t5-small"})
    assert time.monotonic() - start < 5  # refused before transformers could try the network


def test_an_unsupported_model_type_is_refused(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        str(tmp_path / "bert"))
    with pytest.raises(ConfigError, match=r"holds a 'bert' model; lowmem-train trains gpt2, llama, mistral, mt5, "
                                          r"qwen2, t5"):
        build_config(None, {"model.name_or_path": str(tmp_path / "bert")})


def test_the_train_command_refuses_them_in_one_line_with_exit_2(gpt2, tmp_path):
    """The refusals above come from the config tree, before anything is imported: through the real command they are
    one line and exit 2, and the output folder is never made."""
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        str(tmp_path / "bert"))
    out = tmp_path / "out"
    for options, expected in (([f"--model.name_or_path={tmp_path / 'bert'}"], "holds a 'bert' model"),
                              ([f"--model.name_or_path={gpt2}", "--model.num_layers=4"],
                               "--model.num_layers cannot be combined with --model.name_or_path"),
                              (["--config=t5_small", f"--model.name_or_path={gpt2}"], "(set in "),
                              (["--model.name_or_path=google/flan-t5-small"], "nothing is downloaded")):
        assert expected in one_error_line(run_cli(["train", *options, f"--output_dir={out}"], timeout=120))
    assert not out.exists()


def test_more_tokens_than_the_model_has_positions_is_refused(gpt2):
    with pytest.raises(ConfigError, match="--max_seq_len 128 is more than the 64 positions"):
        build_config(None, {"model.name_or_path": str(gpt2), "max_seq_len": "128"})


def one_error_line(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def train(folder, tiny_task, out, *extra):
    return run_cli(["train", f"--model.name_or_path={folder}", f"--train_file={tiny_task['train']}",
                    f"--validation_file=", f"--output_dir={out}", "--max_steps=1", *extra], timeout=300)


@pytest.mark.slow
def test_a_folder_without_weights_or_with_pickled_ones_is_refused(gpt2, tiny_task, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(gpt2, bare)
    (bare / "model.safetensors").unlink()
    assert "has no model.safetensors (no weights)" in one_error_line(train(bare, tiny_task, tmp_path / "a"))
    (bare / "pytorch_model.bin").write_bytes(b"not loaded")
    line = one_error_line(train(bare, tiny_task, tmp_path / "b"))
    assert "pytorch_model.bin: pickled weights are not loaded" in line


@pytest.mark.slow
def test_a_tokenizer_lacking_a_role_without_fallback_is_refused(tmp_path, tiny_task):
    """T5 starts its decoder from the pad token: a T5 folder whose tokenizer has none cannot be laid out."""
    import json

    folder = make("t5", tmp_path / "t5")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["pad_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    before = tree_digest(folder)
    line = one_error_line(train(folder, tiny_task, tmp_path / "out"))
    assert "cannot lay out t5 rows: it has no pad token, which starts T5's decoder" in line
    assert tree_digest(folder) == before
