"""Tokenizers: the bundled task's, trained locally (nothing is downloaded), and a user's, loaded as it is.

Trained: a BPE model over characters (not bytes: Chinese characters stay whole tokens), digits always split one by
one (numbers generalise), and the prior art's special tokens. With a vocabulary no larger than the alphabet plus
the specials, BPE learns no merges and the vocabulary is character level.

Loaded: any tokenizer transformers reads from a folder (tokenizer.json; a folder with only a SentencePiece
spiece.model is converted by transformers' own converter, in memory). The model's family asks it for the tokens
its layout needs by role (families/base.py: pad, end of sequence, a prompt separator) and supplies the documented
fallbacks; a missing role without one is refused in one line. Nothing is written into a user's folder: a
tokenizer is trained only into a folder that holds none, for a new model.
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
    (the family's template), batches pad on the side generation needs, and `model_max_length` is the model's. The
    vocabulary and ids are the training tokenizer's, exactly; its special tokens too, with the pad fallback made
    explicit (a GPT-2 tokenizer pads with <|endoftext|>, as its users set it). The training tokenizer stays bare:
    the trainer lays rows out itself (token-id rows from `prepare` never pass through a tokenizer)."""
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.post_processor = family.template(tokenizer)
    specials = family.specials(tokenizer)
    roles = {role: token for role, token in tokenizer.special_tokens_map.items()
             if role in ("pad_token", "eos_token", "sep_token", "bos_token", "cls_token", "mask_token", "unk_token")}
    roles["pad_token"] = tokenizer.convert_ids_to_tokens(specials.pad)
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side=family.padding_side,
                                   model_max_length=max_length, **roles)


def unreadable(tokenizer_dir: Path, exc: BaseException) -> ConfigError:
    folder = Path(tokenizer_dir)
    file = folder / ("tokenizer.json" if (folder / "tokenizer.json").is_file() else "spiece.model")
    return ConfigError(f"--tokenizer_dir: {file} is not a readable tokenizer ({type(exc).__name__}: "
                       f"{first_line(exc)[:120]}); remove the folder to train a new one, or pass the folder of the "
                       f"tokenizer the model or the data was made with")


def vocab_size(tokenizer_dir: Path) -> int:
    """The vocabulary of the tokenizer saved in tokenizer_dir, read without building a transformers tokenizer."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    except Exception as exc:  # noqa: BLE001 - the Rust reader raises its own exception types for any damage
        raise unreadable(tokenizer_dir, exc) from None


def load_tokenizer(tokenizer_dir: Path, family=None, flag: str = "--tokenizer_dir"):
    """The tokenizer in `tokenizer_dir` as transformers reads it, checked for the roles `family` needs (none
    checked without one). A missing pad token is set to the end-of-sequence token (the documented fallback: padded
    positions are masked), in memory only."""
    from transformers import AutoTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    try:
        if (tokenizer_dir / "tokenizer.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        elif (tokenizer_dir / "spiece.model").is_file():
            tokenizer = convert_sentencepiece(tokenizer_dir, family, flag)
        else:
            raise ConfigError(f"{flag}: {tokenizer_dir} holds no tokenizer (tokenizer.json or spiece.model)")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - damaged JSON or a file of another tokenizer kind: say which folder
        raise unreadable(tokenizer_dir, exc) from None
    if family is not None:
        from lowmem_train.model.families.base import TokenizerRoleError

        try:
            family.specials(tokenizer)
        except TokenizerRoleError as exc:
            raise ConfigError(f"{flag}: the tokenizer in {tokenizer_dir} cannot lay out {family.name} rows: {exc}; "
                              f"use a tokenizer that has it") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def convert_sentencepiece(folder: Path, family, flag: str):
    """A folder with only spiece.model: transformers' own converter, through the family's SentencePiece tokenizer
    class (T5Tokenizer, LlamaTokenizer), in memory. It needs the sentencepiece and protobuf packages."""
    import transformers

    name = getattr(family, "sentencepiece_tokenizer", "")
    if not name:
        raise ConfigError(f"{flag}: {folder} holds only spiece.model, and a {getattr(family, 'name', 'new')} model "
                          f"has no SentencePiece tokenizer class to convert it; save the tokenizer as tokenizer.json")
    return getattr(transformers, name).from_pretrained(str(folder), local_files_only=True)


def load_or_train_tokenizer(tokenizer_dir: Path, texts: Iterator[str] | None, vocab_size: int, family=None):
    """Reuse the tokenizer in tokenizer_dir when there is one (as the prior art did), otherwise train one from
    `texts` into it."""
    tokenizer_dir = Path(tokenizer_dir)
    if (tokenizer_dir / "tokenizer.json").is_file() or (tokenizer_dir / "spiece.model").is_file():
        return load_tokenizer(tokenizer_dir, family)
    if texts is None:
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer there and no training text to build one")
    log.info("training a %d-token tokenizer into %s", vocab_size, tokenizer_dir)
    return train_tokenizer(texts, vocab_size, tokenizer_dir)
