"""The command line and the config tree: composition, types, --help, and one-line errors."""

from __future__ import annotations

import pytest

from lowmem_train.config.cli import add_run_config_options, parse_run_config
from lowmem_train.config.loader import build_config, config_from_dict, config_to_dict, iter_fields
from lowmem_train.config.errors import ConfigError
from tests.helpers import run_cli
from train_low_mem import build_parser


def parse(*argv: str):
    return parse_run_config(build_parser(), ["train", *argv])[0]


def test_equals_and_space_forms_and_booleans():
    cfg = parse("--learn_rate=3e-4", "--epochs", "3", "--is_keep_training=True", "--model.type", "gpt")
    assert (cfg.learn_rate, cfg.epochs, cfg.is_keep_training, cfg.model.type) == (3e-4, 3, True, "gpt")
    for word, value in [("true", True), ("False", False), ("1", True), ("0", False)]:
        assert parse(f"--force={word}").force is value
    assert parse("--is_keep_training").is_keep_training is True  # a bare boolean flag means true


def test_preset_then_overrides():
    cfg = parse("--config", "t5_small", "--learn_rate=3e-4")
    assert cfg.model.d_model == 512 and cfg.learn_rate == 3e-4
    assert cfg.epochs == 2  # from the preset
    assert parse("--config=config/gpt_tiny.yaml").model.type == "gpt"


def test_presets_hold_only_known_fields_and_the_prior_art_shape():
    base = build_config("t5_base")
    assert (base.model.d_model, base.model.num_layers, base.model.num_decoder_layers) == (768, 10, 10)
    for name in ("t5_tiny", "t5_small", "gpt_tiny", "gpt_small"):
        build_config(name)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning_rate=3e-4"], "unknown option --learning_rate; did you mean --learn_rate?"),
        (["--epochs=x"], "invalid value 'x' for --epochs; expected a whole number"),
        (["--is_keep_training=maybe"], "invalid value 'maybe' for --is_keep_training"),
        (["--model.type=bert"], "choose one of t5, gpt"),
        (["--batch_size_per_gpu=0"], "--batch_size_per_gpu must be at least 1"),
        (["--config", "t5_smal"], "preset 't5_smal' not found; did you mean t5_small?"),
        (["--probe_every=3"], "did you mean --memory.probe_every?"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message):
    with pytest.raises(ConfigError) as err:
        parse(*argv)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_resolved_config_round_trips():
    cfg = parse("--config", "gpt_tiny", "--seed=7")
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_help_lists_every_option_with_default_and_meaning():
    import argparse
    import io

    parser = argparse.ArgumentParser()
    add_run_config_options(parser)
    buf = io.StringIO()
    parser.print_help(buf)
    text = " ".join(buf.getvalue().split())
    for info in iter_fields():
        assert f"--{info.name}" in text
        assert info.doc, f"{info.name} has no docstring"
    assert "(default: 0.003)" in text and "Peak learning rate" in text


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--learning_rate=3e-4"], "unknown option --learning_rate; did you mean --learn_rate?"),
        (["train", "--config", "nope"], "preset 'nope' not found"),
        (["train", "--train_file=/nonexistent/x.parquet", "--tokenizer_dir=/nonexistent/tok"],
         "--train_file: file /nonexistent/x.parquet not found"),
        (["trian"], "unknown command 'trian'"),
    ],
)
def test_cli_user_mistakes_exit_2_with_one_line_and_no_traceback(argv, needle, tmp_path):
    result = run_cli(argv + ([f"--output_dir={tmp_path}"] if argv[0] == "train" else []), cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_help_exits_zero():
    result = run_cli(["train", "--help"], timeout=60)
    assert result.returncode == 0
    assert "--batch_size_per_gpu" in result.stdout and "--memory.probe_every" in result.stdout


@pytest.mark.parametrize("command", ["train", "estimate"])
def test_a_corrupt_tokenizer_file_is_one_line_whoever_reads_it_first(tmp_path, command):
    """The pre-flight estimate reads the vocabulary before the data setup would: both name the file, no traceback."""
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    result = run_cli([command, f"--tokenizer_dir={tmp_path / 'tok'}", f"--output_dir={tmp_path / 'out'}"],
                     cwd=tmp_path, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{tmp_path / 'tok' / 'tokenizer.json'} is not a readable tokenizer" in errors[0]
