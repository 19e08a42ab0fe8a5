"""Train a tokenizer locally (nothing is downloaded) and load it as a transformers fast tokenizer.

A BPE model over characters (not bytes: Chinese characters stay whole tokens), digits always split one by
one (numbers generalise), and the prior art's special tokens. With a vocabulary no larger than the alphabet
plus the specials, BPE learns no merges and the vocabulary is character level.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lowmem_train.config.errors import ConfigError, first_line

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "eos_token": "[EOS]",
    "sep_token": "[SEP]",
    "bos_token": "[BOS]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
    "unk_token": "[UNK]",
}


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
    """Train BPE on `texts` (streamed: the trainer never needs them all in memory) and save to out_dir."""
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = normalizers.NFKC()
    # Metaspace keeps spaces recoverable on decode; Digits splits numbers into single digits.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="never"), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    save_tokenizer(fast, out_dir)
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """save_pretrained into a temporary folder, then rename: a half-saved tokenizer is never reused."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tokenizer.save_pretrained(str(tmp))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} appeared while the tokenizer was being trained")
    tmp.rename(out_dir)


def for_export(tokenizer: PreTrainedTokenizerFast, family, max_length: int) -> PreTrainedTokenizerFast:
    """A tokenizer that encodes prompts as the family's models read them: `tok(prompt)` adds what training added
    (the family's template), batches pad on the side generation needs, and `model_max_length` is the model's.
    The training tokenizer stays bare: the trainer lays rows out itself (token-id rows from `prepare` never pass
    through a tokenizer)."""
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.post_processor = family.template(tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side=family.padding_side,
                                   model_max_length=max_length, **SPECIAL_TOKENS)


def unreadable(tokenizer_dir: Path, exc: BaseException) -> ConfigError:
    return ConfigError(f"--tokenizer_dir: {Path(tokenizer_dir) / 'tokenizer.json'} is not a readable tokenizer "
                       f"({type(exc).__name__}: {first_line(exc)[:120]}); remove the folder to train a new one, or "
                       f"pass the folder of the tokenizer the data was made with")


def vocab_size(tokenizer_dir: Path) -> int:
    """The vocabulary of the tokenizer saved in tokenizer_dir, read without building a transformers tokenizer."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    except Exception as exc:  # noqa: BLE001 - the Rust reader raises its own exception types for any damage
        raise unreadable(tokenizer_dir, exc) from None


def load_tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerFast:
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    except Exception as exc:  # noqa: BLE001 - damaged JSON or a file of another tokenizer kind: say which folder
        raise unreadable(tokenizer_dir, exc) from None
    missing = [t for t in SPECIAL_TOKENS.values() if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id) and t != "[UNK]"]
    if missing:
        raise ConfigError(f"--tokenizer_dir: {tokenizer_dir} lacks the special tokens {', '.join(missing)}; remove the "
                          f"folder to train a new one")
    return tokenizer


def load_or_train_tokenizer(tokenizer_dir: Path, texts: Iterator[str] | None, vocab_size: int) -> PreTrainedTokenizerFast:
    """Reuse tokenizer_dir when it exists (as the prior art did), otherwise train one from `texts`."""
    tokenizer_dir = Path(tokenizer_dir)
    if (tokenizer_dir / "tokenizer.json").is_file():
        return load_tokenizer(tokenizer_dir)
    if texts is None:
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer there and no training text to build one")
    log.info("training a %d-token tokenizer into %s", vocab_size, tokenizer_dir)
    return train_tokenizer(texts, vocab_size, tokenizer_dir)
