"""The `generate` command: answers from an exported model folder, with transformers' `generate` alone.

Prompts are encoded the way the trainer encodes them (trainer/data/encode.py); the functions that do it
live here, free of trainer code, so that evaluation can share them instead of keeping a copy:
    t5  (encoder-decoder): input = prompt [EOS]; the decoder writes the answer.
    gpt (causal):          input = prompt [SEP]; left-padded, so that every row of a batch continues from its
                           own last token, and only the continuation is the answer.
Output: one line per prompt, `prompt<TAB>answer` (tabs and newlines inside either are written as \\t, \\n).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lowmem_train.config.schema import ConfigError

log = logging.getLogger(__name__)

HELP = "answer prompts with an exported model: greedy, top-k, top-p or beam search"
STRATEGIES = ("greedy", "top_k", "top_p", "beam")
EXPORT_HINT = "python train_low_mem.py export --checkpoint RUN/checkpoints/latest --output DIR"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="model folder written by `export` (or a run's final/)")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt; repeat for several")
    parser.add_argument("--prompts_file", metavar="FILE",
                        help="UTF-8 text file, one prompt per line (blank lines skipped)")
    parser.add_argument("--max_new_tokens", type=int, default=32, metavar="N", help="answer length limit (default: 32)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="greedy", help="decoding strategy (default: greedy)")
    parser.add_argument("--top_k", type=int, default=50, metavar="K",
                        help="top_k: sample among the K likeliest tokens (default: 50)")
    parser.add_argument("--top_p", type=float, default=0.9, metavar="P",
                        help="top_p: sample among the likeliest tokens holding probability P (default: 0.9)")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T",
                        help="sampling temperature for top_k/top_p (default: 1.0)")
    parser.add_argument("--num_beams", type=int, default=4, metavar="N", help="beam: beams kept (default: 4)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of sampling: same seed, prompts and batch size, same answers (default: 0)")
    parser.add_argument("--batch_size", type=int, default=16, metavar="N",
                        help="prompts per generate call (default: 16)")


# ---- encoding: shared by anything that asks a trained model for answers ------------------------------------
def model_kind(config) -> str:
    """'t5' or 'gpt': which of the trainer's two input formats a model config was trained on."""
    return "t5" if getattr(config, "is_encoder_decoder", False) else "gpt"


def prompt_ids(tokenizer, kind: str, text: str) -> list[int]:
    """Token ids of one prompt as the model saw prompts in training: prompt [EOS] (t5) or prompt [SEP] (gpt)."""
    end = tokenizer.eos_token_id if kind == "t5" else tokenizer.sep_token_id
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [end]


def pad_prompts(prompts: list[list[int]], pad_id: int, kind: str):
    """(input_ids, attention_mask): right-padded for t5 (the encoder reads the mask), left-padded for gpt."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        cols = slice(width - len(p), width) if kind == "gpt" else slice(0, len(p))
        ids[i, cols] = torch.as_tensor(p, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def decode_answers(tokenizer, output, input_width: int, kind: str) -> list[str]:
    """Decoded answers; a causal model's output starts with its (padded) input, which is not the answer."""
    if kind == "gpt":
        output = output[:, input_width:]
    return [tokenizer.decode(seq, skip_special_tokens=True) for seq in output.tolist()]


def strategy_kwargs(args) -> dict:
    """`generate` options of a strategy; only the ones it uses, so transformers warns about nothing unused."""
    if args.strategy == "greedy":
        return {"do_sample": False, "num_beams": 1}
    if args.strategy == "beam":  # early_stopping=True would end on the first num_beams finished, often short, answers
        return {"do_sample": False, "num_beams": args.num_beams}
    if args.strategy == "top_k":  # top_p=1.0 so that only k limits the choice
        return {"do_sample": True, "top_k": args.top_k, "top_p": 1.0, "temperature": args.temperature}
    return {"do_sample": True, "top_p": args.top_p, "top_k": 0, "temperature": args.temperature}


# ---- the command -----------------------------------------------------------------------------------------
def check_options(args) -> None:
    bounds = [("--max_new_tokens", args.max_new_tokens >= 1, "at least 1"),
              ("--batch_size", args.batch_size >= 1, "at least 1"),
              ("--top_k", args.top_k >= 1, "at least 1"),
              ("--num_beams", args.num_beams >= 1, "at least 1"),
              ("--top_p", 0 < args.top_p <= 1, "in (0, 1]"),
              ("--temperature", args.temperature > 0, "positive")]
    for flag, ok, rule in bounds:
        if not ok:
            raise ConfigError(f"{flag} must be {rule} (got {getattr(args, flag[2:])})")


def read_prompts(args) -> list[str]:
    """--prompt values, then the lines of --prompts_file; an empty prompt is a mistake, not a request."""
    for i, text in enumerate(args.prompt):
        if not text.strip():
            raise ConfigError(f"--prompt #{i + 1} is empty; give the text to answer, e.g. --prompt 12345")
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise ConfigError(f"--prompts_file: {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--prompts_file: cannot read {path} as UTF-8 text ({type(exc).__name__})") from None
        from_file = [line for line in lines if line.strip()]
        if not from_file:
            raise ConfigError(f"--prompts_file: {path} has no prompts; write one prompt per line")
        prompts += from_file
    if not prompts:
        raise ConfigError("no prompt given; pass --prompt TEXT (repeatable) or --prompts_file FILE")
    return prompts


def load_model(folder: Path):
    """(model, tokenizer, kind) from an exported folder, with plain transformers and nothing downloaded."""
    if not folder.exists():
        raise ConfigError(f"--model: {folder} does not exist; export a checkpoint first: {EXPORT_HINT}")
    has_weights = any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()
    if not folder.is_dir() or not (folder / "config.json").is_file() or not has_weights:
        if (folder / "final" / "config.json").is_file():
            raise ConfigError(f"--model: {folder} is a run folder; its final model is {folder / 'final'}")
        if (folder / "train_state.json").is_file() or (folder / "checkpoints").is_dir():
            raise ConfigError(f"--model: {folder} is a training checkpoint or run folder, not a model; export it "
                              f"first: {EXPORT_HINT}")
        raise ConfigError(f"--model: {folder} holds no model (config.json + model.safetensors); point it at a folder "
                          f"written by `export` or a run's final/")
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"--model: {folder} has no tokenizer (tokenizer.json); re-export it with `export`")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load is noise next to the answers
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        kind = model_kind(config)
        model_cls = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
        model = model_cls.from_pretrained(folder, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # corrupt or foreign files: say which folder
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"--model: cannot load {folder} ({type(exc).__name__}: {first})") from None
    if kind == "gpt" and tokenizer.sep_token_id is None:
        raise ConfigError(f"--model: the tokenizer in {folder} has no sep_token, which ends a prompt for a gpt "
                          f"model here")
    return model, tokenizer, kind


def one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\r", "\\r").replace("\n", "\\n")


def run(args, cfg) -> int:
    check_options(args)
    prompts = read_prompts(args)  # before loading the model: a typo fails in a second, not after the load
    model, tokenizer, kind = load_model(Path(args.model))
    encoded = [prompt_ids(tokenizer, kind, p) for p in prompts]
    if any(tokenizer.unk_token_id in ids for ids in encoded):
        log.warning("some prompts contain characters the tokenizer does not know; they are read as %s",
                    tokenizer.unk_token)
    # A causal model has a fixed number of positions: prompt + answer must fit in it.
    positions = None
    if kind == "gpt":
        positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    for text, ids in zip(prompts, encoded):
        if positions and len(ids) >= positions:
            raise ConfigError(f"prompt {text[:40]!r} is {len(ids)} tokens; this model holds {positions} (prompt + answer)")

    import torch

    torch.manual_seed(args.seed)
    options = strategy_kwargs(args)
    clipped = False
    for start in range(0, len(prompts), args.batch_size):
        batch = encoded[start:start + args.batch_size]
        ids, mask = pad_prompts(batch, tokenizer.pad_token_id, kind)
        new_tokens = args.max_new_tokens
        if positions and ids.shape[1] + new_tokens > positions:
            new_tokens, clipped = positions - ids.shape[1], True
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, **options)
        answers = decode_answers(tokenizer, out, ids.shape[1], kind)
        for text, answer in zip(prompts[start:start + args.batch_size], answers):
            print(f"{one_line(text)}\t{one_line(answer)}", flush=True)
    if clipped:
        log.warning("answers were cut to fit the model's %d positions (prompt + answer)", positions)
    return 0
