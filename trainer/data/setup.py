"""Everything the data path needs before training: the bundled task (generated when missing), the
tokenizer (reused or trained), and the parquet indexes. Rank 0 does the writing, the others wait: the caller
passes that ordering in (`main_first`), so the data layer holds no collective of its own."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from lowmem_train.config.schema import RunConfig
from lowmem_train.model import families
from lowmem_train.model.tokenizer import load_or_train_tokenizer, load_tokenizer
from lowmem_train.trainer.data.encode import vocab_fingerprint
from lowmem_train.trainer.data.source import DataError, ParquetIndex, iter_rows, resolve_files
from lowmem_train.trainer.data.zh_numerals import write_task

log = logging.getLogger(__name__)

BUNDLED = RunConfig()  # the defaults point at the bundled task


@dataclass
class LoadedData:
    tokenizer: object
    train_index: ParquetIndex
    validation_index: ParquetIndex | None


def is_bundled_task(cfg: RunConfig) -> bool:
    return Path(cfg.train_file) == Path(BUNDLED.train_file)


def ensure_bundled_task(cfg: RunConfig) -> None:
    """Generate the Arabic -> Chinese numerals task where the defaults expect it, once."""
    train = Path(cfg.train_file)
    if is_bundled_task(cfg) and not train.exists():
        log.info("generating the bundled task (Arabic number -> Chinese numerals) in %s", train.parent)
        write_task(train.parent)


def check_input_files(cfg: RunConfig) -> None:
    """Refuse a missing --train_file / --validation_file in one line before anything heavy exists (a process
    group, the estimate's model): a typo should cost a user no more than starting Python. The bundled task's
    files may be missing: they are generated."""
    bundled = is_bundled_task(cfg)
    if not bundled:
        resolve_files(cfg.train_file, "--train_file")
    if cfg.validation_file and not (bundled and Path(cfg.validation_file) == Path(BUNDLED.validation_file)):
        resolve_files(cfg.validation_file, "--validation_file")


def tokenizer_texts(index: ParquetIndex, limit_rows: int = 2_000_000) -> Iterator[str]:
    """Prompts and responses, streamed (a tokenizer trainer does not need the table in memory)."""
    for i, row in enumerate(iter_rows(index)):
        if i >= limit_rows:
            return
        yield from (text for text in row if isinstance(text, str))


def check_token_ids(index: ParquetIndex, tokenizer, what: str) -> None:
    """Token ids (from `prepare --tokenize`) mean something only with the tokenizer that wrote them."""
    if index.kind == "tokens" and index.vocab and index.vocab != vocab_fingerprint(tokenizer):
        raise DataError(f"{what}: {index.files[0]} holds token ids of another tokenizer than the one in "
                        f"--tokenizer_dir; pass the --tokenizer_dir that `prepare` used")


def load_datasets(cfg: RunConfig, is_main: bool, main_first: Callable[[], ContextManager]) -> LoadedData:
    """The tokenizer and the indexes of both splits. `main_first()` runs its block on the main process first
    (which may generate the bundled task and train the tokenizer), then on the others."""
    columns = (cfg.data.prompt_column, cfg.data.response_column)
    with main_first():
        if is_main:
            ensure_bundled_task(cfg)
        train_index = ParquetIndex.build(cfg.train_file, columns, "--train_file")
        tokenizer_files = [Path(cfg.tokenizer_dir) / name for name in ("tokenizer.json", "spiece.model")]
        if train_index.kind == "tokens" and not any(f.is_file() for f in tokenizer_files):
            raise DataError(f"--train_file: {cfg.train_file} holds token ids, but --tokenizer_dir "
                            f"{cfg.tokenizer_dir} holds no tokenizer; pass the one `prepare` used")
        family = families.get(cfg.model.type)
        if cfg.model.name_or_path:  # a pretrained model brings its tokenizer: never trained, nothing written there
            tokenizer = load_tokenizer(Path(cfg.tokenizer_dir), family)
        else:
            texts = tokenizer_texts(train_index) if is_main else None
            tokenizer = load_or_train_tokenizer(Path(cfg.tokenizer_dir), texts, cfg.model.vocab_size, family)
    check_token_ids(train_index, tokenizer, "--train_file")
    validation_index = None
    if cfg.validation_file:
        optional = (cfg.data.case_column,) if cfg.data.case_column else ()
        validation_index = ParquetIndex.build(cfg.validation_file, columns, "--validation_file", optional)
        check_token_ids(validation_index, tokenizer, "--validation_file")
    return LoadedData(tokenizer, train_index, validation_index)
