"""`generate`: answers from an exported model folder, one `prompt<TAB>answer` line per prompt.

Tabs and newlines inside a prompt or an answer are written as \\t and \\n, so every answer stays on its line.
"""

from __future__ import annotations

from pathlib import Path

from lowmem_train.config.errors import ConfigError

HELP = "answer prompts with an exported model: greedy, top-k, top-p or beam search"
STRATEGIES = ("greedy", "top_k", "top_p", "beam")


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


def one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\r", "\\r").replace("\n", "\\n")


def decoding(args):
    from lowmem_train.model.generate import Decoding

    return Decoding(args.strategy, args.max_new_tokens, args.top_k, args.top_p, args.temperature, args.num_beams)


def run(args, cfg) -> int:
    import logging

    import torch

    from lowmem_train.model.generate import answer_prompts, load_exported

    log = logging.getLogger(__name__)
    check_options(args)
    prompts = read_prompts(args)  # before loading the model: a typo fails in a second, not after the load
    exported = load_exported(Path(args.model))
    torch.manual_seed(args.seed)
    result = answer_prompts(exported, prompts, decoding(args), args.batch_size)
    if result.unknown_characters:
        log.warning("some prompts contain characters the tokenizer does not know; they are read as %s",
                    exported.tokenizer.unk_token)
    for text, answer in zip(prompts, result.answers):
        print(f"{one_line(text)}\t{one_line(answer)}", flush=True)
    if result.clipped:
        log.warning("answers were cut to fit the model's %d positions (prompt + answer)", exported.positions)
    return 0
