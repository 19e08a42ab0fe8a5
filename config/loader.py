"""Build a RunConfig from defaults <- YAML preset <- command-line overrides, and write it back as YAML.

The tree is walked generically (dataclass fields, resolved type hints, attribute docstrings), so adding a
field to `schema.py` is all it takes for it to appear in presets, on the command line and in `--help`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Literal, get_args, get_origin

import yaml

from lowmem_train.config.errors import ConfigError
from lowmem_train.config.schema import RunConfig
from lowmem_train.config.shipped import PRESET_DIR
TRUE_WORDS = {"true", "1", "yes", "on"}
FALSE_WORDS = {"false", "0", "no", "off"}


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One leaf option of the tree, e.g. `memory.probe_every`."""

    name: str
    type: Any
    default: Any
    doc: str


@lru_cache(maxsize=None)
def attribute_docs(cls: type) -> dict[str, str]:
    """The string literal right under each annotated attribute of a class (PEP 257 attribute docstrings)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def iter_fields(cls: type = RunConfig, prefix: str = "") -> Iterator[FieldInfo]:
    """Every leaf field of the tree, depth first, with dotted names for nested sections."""
    hints = typing.get_type_hints(cls)
    docs = attribute_docs(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        ftype = hints[f.name]
        if dataclasses.is_dataclass(ftype):
            yield from iter_fields(ftype, f"{prefix}{f.name}.")
        else:
            yield FieldInfo(f"{prefix}{f.name}", ftype, getattr(instance, f.name), docs.get(f.name, ""))


@lru_cache(maxsize=None)
def field_table() -> dict[str, FieldInfo]:
    return {info.name: info for info in iter_fields()}


def suggest(name: str, choices: list[str]) -> str:
    """'; did you mean X?' for the closest choice, or '' when nothing is close."""
    best = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if not best:  # also try the last component alone: `--probe_every` -> `--memory.probe_every`
        tails = {c.rsplit(".", 1)[-1]: c for c in choices}
        hit = difflib.get_close_matches(name.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.75)
        best = [tails[hit[0]]] if hit else []
    return f"; did you mean --{best[0]}?" if best else ""


def type_label(ftype: Any) -> str:
    if get_origin(ftype) is Literal:
        return "{" + ",".join(str(a) for a in get_args(ftype)) + "}"
    if is_union(ftype):  # bool | Literal["auto"] -> {true,false,auto}
        return "{" + ",".join("true,false" if a is bool else type_label(a).strip("{}") for a in get_args(ftype)) + "}"
    if is_text_list(ftype):
        return "NAME[,NAME...]"
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT"}.get(ftype, "YAML")


def is_text_list(ftype: Any) -> bool:
    return get_origin(ftype) is list and get_args(ftype) == (str,)


def is_union(ftype: Any) -> bool:
    return isinstance(ftype, types.UnionType) or get_origin(ftype) is typing.Union


def takes_bare_flag(ftype: Any) -> bool:
    """A bare `--flag` means true for booleans (and unions with a boolean, like is_keep_training)."""
    return ftype is bool or (is_union(ftype) and bool in get_args(ftype))


def coerce(label: str, ftype: Any, value: Any) -> Any:
    """Turn a YAML value or a command-line string into the field's type, or raise a one-line ConfigError.

    `label` names the option as the user wrote it: `--epochs`, or `config/t5_small.yaml: epochs`.
    """
    text = value.strip() if isinstance(value, str) else value
    bad = f"invalid value {value!r} for {label}"
    if is_union(ftype):  # the first member that takes the value
        for member in get_args(ftype):
            try:
                return coerce(label, member, value)
            except ConfigError:
                continue
        raise ConfigError(f"{bad}; expected one of {type_label(ftype).strip('{}').replace(',', ', ')}")
    if get_origin(ftype) is Literal:
        choices = get_args(ftype)
        if text in choices:
            return text
        raise ConfigError(f"{bad}; choose one of {', '.join(map(str, choices))}")
    if ftype is bool:
        if isinstance(text, bool):
            return text
        if isinstance(text, (str, int)) and str(text).lower() in TRUE_WORDS | FALSE_WORDS:
            return str(text).lower() in TRUE_WORDS
        raise ConfigError(f"{bad}; expected true/false (also True/False/1/0)")
    if ftype is int:
        if isinstance(text, bool):
            raise ConfigError(f"{bad}; expected a whole number")
        try:
            as_float = float(text)
        except (TypeError, ValueError):
            raise ConfigError(f"{bad}; expected a whole number") from None
        if not as_float.is_integer():
            raise ConfigError(f"{bad}; expected a whole number")
        return int(as_float)
    if ftype is float:
        if isinstance(text, bool):
            raise ConfigError(f"{bad}; expected a number")
        try:
            return float(text)
        except (TypeError, ValueError):
            raise ConfigError(f"{bad}; expected a number") from None
    if ftype is str:
        if isinstance(text, (dict, list)):
            raise ConfigError(f"{bad}; expected text")
        return "" if text is None else str(text)
    if is_text_list(ftype):  # `bleu,rouge_l` on the command line, a YAML list in a preset
        if isinstance(text, str) and not text.startswith("["):
            return [part.strip() for part in text.split(",") if part.strip()]
        items = yaml.safe_load(text) if isinstance(text, str) else text
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{bad}; expected names separated by commas")
        return items
    # Structured fields (lists, dicts): YAML on the command line, taken as is from a preset.
    return yaml.safe_load(text) if isinstance(text, str) else text


def resolve_preset(preset: str) -> Path:
    """A preset is a YAML path, or the bare name of one of the presets shipped in config/."""
    path = Path(preset)
    if path.is_file():
        return path
    named = PRESET_DIR / f"{preset.removesuffix('.yaml')}.yaml"
    if named.is_file() and path.parent == Path("."):
        return named
    shipped = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    hint = suggest(path.stem, shipped).replace("--", "")
    raise ConfigError(f"--config: preset {preset!r} not found{hint or ''}; shipped presets: {', '.join(shipped)}")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and any(n.startswith(name + ".") for n in field_table()):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def read_preset(preset: str) -> dict[str, Any]:
    path = resolve_preset(preset)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    return {name: (value, str(path)) for name, value in flatten(tree).items()}


def build_config(preset: str | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """defaults <- preset file <- overrides (dotted name -> text or value), typed and validated."""
    values: dict[str, tuple[Any, str]] = read_preset(preset) if preset else {}
    values.update({name: (text, f"--{name}") for name, text in (overrides or {}).items()})
    cfg = apply_values(RunConfig(), values)
    resolve_pretrained(cfg, values)
    if cfg.optimizer == "adafactor" and "learn_rate" not in values:  # the default learn_rate is AdamW's
        from lowmem_train.config.schema import ADAFACTOR_LEARN_RATE

        cfg.learn_rate = ADAFACTOR_LEARN_RATE
    return cfg.validate()


def resolve_pretrained(cfg: RunConfig, values: dict[str, tuple[Any, str]]) -> None:
    """A model that starts from a pretrained folder (--model.name_or_path, or the prior art's --is_finetune with
    --finetune_from) takes its family and shape from the folder's config.json, and its tokenizer from the folder
    unless --tokenizer_dir names another. Shape options set beside it (typed, or from a preset) would be ignored:
    they are refused, naming where they came from. Saved configs (a checkpoint's) hold the resolved fields already
    and do not come through here."""
    from lowmem_train.model.pretrained import SHAPE_FIELDS, PretrainedFolder, resolve_model_fields

    flag = "--model.name_or_path"
    if cfg.is_finetune and not cfg.model.name_or_path:
        cfg.model.name_or_path = cfg.finetune_from or str(Path(cfg.output_dir) / "final")
        flag = "--finetune_from" if cfg.finetune_from else "--is_finetune (output_dir/final)"
    if not cfg.model.name_or_path:
        return
    given = [f"model.{name}" for name in SHAPE_FIELDS if f"model.{name}" in values]
    if given:
        where = values[given[0]][1]
        source = "" if where == f"--{given[0]}" else f" (set in {where})"
        raise ConfigError(f"--{given[0]}{source} cannot be combined with {flag}: the model's family and shape come "
                          f"from {Path(cfg.model.name_or_path) / 'config.json'}; drop it")
    folder = PretrainedFolder(cfg.model.name_or_path, flag)
    for name, value in resolve_model_fields(cfg.model, folder).items():
        setattr(cfg.model, name, value)
    if "tokenizer_dir" not in values:
        cfg.tokenizer_dir = cfg.model.name_or_path
    from lowmem_train.model import families

    positions = families.get(cfg.model.type).max_positions(folder.config)
    if positions is not None and cfg.max_seq_len > positions:
        raise ConfigError(f"--max_seq_len {cfg.max_seq_len} is more than the {positions} positions of "
                          f"{cfg.model.name_or_path}; use at most {positions}")


def apply_values(cfg: RunConfig, values: dict[str, tuple[Any, str]]) -> RunConfig:
    """Set dotted fields from (value, where-it-came-from) pairs; `where` names the source in errors."""
    table = field_table()
    for name, (value, where) in values.items():
        label = where if where.startswith("--") else f"{where}: {name}"
        if name not in table:
            raise ConfigError(f"unknown option {label}{suggest(name, list(table))}")
        typed = coerce(label, table[name].type, value)
        *parents, leaf = name.split(".")
        target = cfg
        for part in parents:
            target = getattr(target, part)
        setattr(target, leaf, typed)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(tree: dict[str, Any], where: str = "saved config") -> RunConfig:
    """The inverse of config_to_dict, for configs saved in run folders and checkpoints."""
    return apply_values(RunConfig(), {k: (v, where) for k, v in flatten(tree).items()}).validate()


def save_config(cfg: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# The fully resolved configuration of this run (defaults <- preset <- command line).\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
