"""A user's pretrained model: a local folder in `save_pretrained` format. Nothing is downloaded, nothing is written
into it.

    folder/config.json                                the architecture: its model_type picks the family
    folder/model.safetensors                          the weights, or model-0000k-of-0000n.safetensors shards
      (or model.safetensors.index.json + shards)      listed by the index's weight_map
    folder/tokenizer.json (or spiece.model)           the tokenizer, unless --tokenizer_dir names another

Loading is strict: every tensor of the model comes from the file (an alias of a tied weight, which save_pretrained
stores once, is the only key that may be absent), and the file holds nothing the model does not have. A missing,
unexpected or misshapen tensor is an error naming it, not a half-random model.

Two traps of transformers 5.x this module steps around (found by trying, see the tests):
- T5 and mT5 configs always say tie_word_embeddings=True (the old flag became `scale_decoder_outputs`), while the
  weights of T5 v1.1, Flan-T5 and mT5 hold an lm_head of their own: a model built from the config shares one
  tensor for both, and loading the file would overwrite one with the other. The family unties the head first
  when the file's two tensors differ (t5.py).
- A path that is not a folder is taken for a hub id, and with peft installed transformers retries the network for
  half a minute: a folder is checked here before transformers sees it, and HF_HUB_OFFLINE is set by the commands.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from lowmem_train.config.errors import ConfigError, first_line
from lowmem_train.trainer.compat import full_shape

FLAG = "--model.name_or_path"
SHAPE_FIELDS = ("type", "d_model", "num_layers", "num_decoder_layers", "num_heads", "d_ff", "vocab_size")


ARCHITECTURE = "architecture"  # a checkpoint's copy of a pretrained model's config (save_architecture)
UNTIED_MARK = "lowmem_architecture.json"


class PretrainedFolder:
    """A local pretrained model folder; its config and weights are read when first asked for. A checkpoint's
    `architecture/` folder is one without weights (save_architecture): resume and export build from it."""

    def __init__(self, path: str | Path, flag: str = FLAG):
        self.path, self.flag = Path(path), flag
        if not self.path.is_dir():
            looks_like_hub = "/" in str(path) and not str(path).startswith((".", "/")) and str(path).count("/") == 1
            hint = (" (it looks like a Hugging Face Hub name: nothing is downloaded here; save the model to a folder "
                    "with save_pretrained, or download it with `huggingface-cli download`, and pass that folder)"
                    if looks_like_hub else "")
            raise ConfigError(f"{flag}: {path} is not a folder{hint}")
        if not (self.path / "config.json").is_file():
            raise ConfigError(f"{flag}: {self.path} has no config.json; pass a folder written by save_pretrained")

    @cached_property
    def config(self):
        """The transformers config (AutoConfig, from the folder only)."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(self.path), local_files_only=True)
        except (ValueError, OSError, KeyError) as exc:
            raise ConfigError(f"{self.flag}: {self.path / 'config.json'} is not a config transformers reads "
                              f"({first_line(exc)[:160]})") from None

    @cached_property
    def weight_files(self) -> dict[str, Path]:
        """Tensor name -> the safetensors file holding it."""
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{self.flag}: {index} is unreadable ({first_line(exc)[:120]})") from None
            return {name: self.path / file for name, file in weight_map.items()}
        single = self.path / "model.safetensors"
        if not single.is_file():
            other = [p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            why = (f"it holds {', '.join(other[:3])}: pickled weights are not loaded; convert them once with "
                   "`AutoModel*.from_pretrained(folder).save_pretrained(folder_out)`") if other else "no weights"
            raise ConfigError(f"{self.flag}: {self.path} has no model.safetensors ({why})")
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return dict.fromkeys(f.keys(), single)

    def head_differs_from_embeddings(self, head: str, embeddings: str) -> bool:
        """Does this model keep a head of its own (T5 v1.1, Flan-T5, mT5)? Said by the weights, or, for a
        checkpoint's architecture folder, by what save_architecture recorded."""
        mark = self.path / UNTIED_MARK
        if mark.is_file():
            return head in json.loads(mark.read_text(encoding="utf-8")).get("untied", [])
        import torch

        files = self.weight_files
        with torch.device("cpu"):  # also when the model is being built on the meta device (the estimate)
            return head in files and embeddings in files and not torch.equal(self.tensor(head),
                                                                              self.tensor(embeddings))

    def tensor(self, name: str):
        """One tensor, read alone (the rest of the file stays on disk)."""
        from safetensors import safe_open

        with safe_open(str(self.weight_files[name]), "pt") as f:
            return f.get_tensor(name)

    def state_dict(self) -> dict:
        from safetensors.torch import load_file

        out = {}
        for file in sorted(set(self.weight_files.values())):
            try:
                out.update(load_file(str(file)))
            except Exception as exc:  # noqa: BLE001 - the reader raises its own types on damaged files
                raise ConfigError(f"{self.flag}: cannot read {file} ({type(exc).__name__}: "
                                  f"{first_line(exc)[:120]})") from None
        return out


def save_architecture(model, folder: Path) -> None:
    """The model's config (and which heads were untied from the embeddings) in `folder`, without weights: what a
    checkpoint needs to rebuild a pretrained model's architecture when the user's folder has moved or gone."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(folder))
    shared = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in tied_aliases(model)}
    untied = [name for name, p in model.named_parameters() if name.endswith("lm_head.weight") and id(p) not in shared]
    (folder / UNTIED_MARK).write_text(json.dumps({"untied": untied}) + "\n", encoding="utf-8")


def tied_aliases(model) -> set[str]:
    """Weights that share another's tensor (GPT-2's lm_head, T5's embed_tokens): save_pretrained stores one name."""
    seen: dict[int, str] = {}
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        else:
            seen[id(param)] = name
    return aliases


def check_weights(model, state_dict: dict, where: str) -> None:
    """Every tensor of `model` in `state_dict` with its shape, and nothing else; raise ConfigError naming one."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    shapes = {name: full_shape(p) for name, p in model.named_parameters()}  # whole shapes, also under ZeRO-3
    expected.update(shapes)
    missing = sorted(set(expected) - set(state_dict) - tied_aliases(model))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [(n, tuple(state_dict[n].shape), expected[n]) for n in sorted(set(state_dict) & set(expected))
             if tuple(state_dict[n].shape) != expected[n]]
    if missing or unexpected:
        example = (missing + unexpected)[0]
        raise ConfigError(f"{where}: the weights do not match its config.json ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected tensors, e.g. {example!r} "
                          f"{'missing' if missing else 'unexpected'}); is it a complete save_pretrained folder?")
    if wrong:
        name, got, want = wrong[0]
        raise ConfigError(f"{where}: {name} has shape {got} but its config.json gives {want}")


def load_weights(model, folder: PretrainedFolder, gather=None) -> None:
    """The folder's weights into `model` (built from its config by the family), strictly (check_weights).
    `gather`: a context that makes the parameters whole while loading (deepspeed.zero.GatheredParameters under
    ZeRO-3, where each rank holds a partition)."""
    import contextlib

    state_dict = folder.state_dict()
    check_weights(model, state_dict, f"{folder.flag}: {folder.path}")
    with gather or contextlib.nullcontext():
        model.load_state_dict(state_dict, strict=False)  # strictness checked above, aliases included


def resolve_model_fields(model_cfg, folder: PretrainedFolder) -> dict:
    """The config tree's model fields as the folder's architecture sets them (its family reads config.json)."""
    from lowmem_train.model import families

    try:
        family = families.for_hf_config(folder.config)
    except ValueError:
        raise ConfigError(f"{folder.flag}: {folder.path} holds a {folder.config.model_type!r} model; lowmem-train "
                          f"trains {', '.join(families.supported_hf_types())}") from None
    fields = family.model_fields(folder.config)
    if model_cfg.dropout is None:
        fields["dropout"] = family.pretrained_dropout(folder.config)
    return {"type": family.name, **fields}
