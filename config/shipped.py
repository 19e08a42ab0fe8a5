"""Files that ship with lowmem-train: YAML presets, DeepSpeed configs, launcher configs.

They sit next to the code both in a checkout (config/, ds_configs/, accelerate_configs/ at the repository root)
and in an installed wheel (lowmem_train/config/, lowmem_train/ds_configs/, ...): the package's folders map to
the repository's top-level folders (pyproject.toml, [tool.setuptools.package-dir]).
"""

from __future__ import annotations

from pathlib import Path

from lowmem_train.config.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent  # the repository root, or site-packages/lowmem_train
PRESET_DIR = ROOT / "config"
DS_CONFIG_DIR = ROOT / "ds_configs"
ACCELERATE_CONFIG_DIR = ROOT / "accelerate_configs"


def shipped_names(folder: Path, suffix: str) -> list[str]:
    return sorted(p.stem for p in folder.glob(f"*{suffix}"))


def ds_config_file(choice: str) -> Path:
    """A DeepSpeed JSON: a path, or the name of a shipped one (`zero2_offload` or `zero2_offload.json`)."""
    path = Path(choice)
    if path.is_file():
        return path
    named = DS_CONFIG_DIR / f"{path.name.removesuffix('.json')}.json"
    if named.is_file() and (path.parent == Path(".") or path.parent.name == "ds_configs"):
        return named
    shipped = ", ".join(shipped_names(DS_CONFIG_DIR, ".json"))
    raise ConfigError(f"--deepspeed_config: {choice} not found (shipped: {shipped}; or 'none' / 'auto')")
