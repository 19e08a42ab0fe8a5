"""Model families: one module per kind of transformer (t5.py, gpt.py, ...), each defining `FAMILY`.

Everything outside this folder asks a family object instead of testing a name (see base.py for what a family
knows). Adding a family is one new module here: its file name is its `--model.type`. Names are read from the
folder without importing anything, so the config can check `--model.type` cheaply; a family's module is imported
the first time it is asked for.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lowmem_train.model.families.base import ModelFamily

DEFAULT = "t5"  # listed first in choices: it is the default --model.type
_REGISTERED: dict[str, "ModelFamily"] = {}  # families added at run time (register), e.g. by a plugin or a test


def names() -> list[str]:
    """Every family's name, the default first."""
    found = {m.name for m in pkgutil.iter_modules(__path__) if m.name != "base" and not m.name.startswith("_")}
    found |= set(_REGISTERED)
    return sorted(found, key=lambda n: (n != DEFAULT, n))


@lru_cache(maxsize=None)
def _load(name: str) -> "ModelFamily":
    return importlib.import_module(f"{__name__}.{name}").FAMILY


def get(name: str) -> "ModelFamily":
    """The family called `name` (a ValueError naming the choices for an unknown one)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in names():
        raise ValueError(f"unknown model family {name!r}; choose one of {', '.join(names())}")
    return _load(name)


def register(family: "ModelFamily") -> None:
    """Add a family defined outside this folder (it then works everywhere a shipped one does)."""
    _REGISTERED[family.name] = family


def supported_hf_types() -> list[str]:
    """Every config.model_type some family trains."""
    return sorted({t for name in names() for t in get(name).hf_model_types})


def for_hf_config(config) -> "ModelFamily":
    """The family whose models a Hugging Face config describes (an exported folder's config.json)."""
    for name in names():
        family = get(name)
        if config.model_type in family.hf_model_types:
            return family
    raise ValueError(f"no model family trains a {config.model_type!r} model; families: {', '.join(names())}")
