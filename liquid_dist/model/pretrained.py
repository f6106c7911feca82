"""The single-GPU format: a directory of safetensors weights plus the model config.

Layout of a converted model (written by ``python -m liquid_dist.convert``)::

    config.json                  the ModelConfig, as a flat JSON object
    model.safetensors            every weight once, original names (no ``model.`` prefix)
      or model-0000i-of-0000N.safetensors + model.safetensors.index.json (weight_map)
    tokenizer.model              the sentencepiece model the run was trained with
    generation_config.json       decoding defaults for ``liquid_dist.generate``
    README.md                    model card

Tied weights are stored once under their canonical name (the first name
``named_parameters()`` gives, e.g. ``token_embedding.weight``); the model
re-ties them itself when built from ``config.json`` (``tie_embeddings``), so
loading needs nothing but this directory: safetensors only, no pickle, no
DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..config import ConfigError, ModelConfig, flatten_keys, model_config_from_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.model"
GENERATION_CONFIG_NAME = "generation_config.json"
MODEL_CARD_NAME = "README.md"

# settings that change how the model trains or runs, not what its weights mean:
# a converted model may be fine-tuned or served with other values
RUNTIME_FIELDS = frozenset({
    "dropout", "activation_checkpointing", "check_finite", "recon_loss_weight",
    "attention_backend", "moe.backend", "moe.entropy_loss_weight", "moe.overuse_loss_weight",
    "moe.overuse_threshold",
})


def is_pretrained_dir(path: Union[str, Path]) -> bool:
    """True when ``path`` is a converted model directory (config.json + weights)."""
    p = Path(path)
    return (p / CONFIG_NAME).is_file() and ((p / WEIGHTS_NAME).is_file()
                                            or (p / INDEX_NAME).is_file())


def read_model_config(path: Union[str, Path]) -> ModelConfig:
    """The validated ModelConfig of a converted model directory."""
    p = Path(path)
    if not is_pretrained_dir(p):
        raise FileNotFoundError(f"{p}: not a converted model (needs {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME} or {INDEX_NAME}; see python -m "
                                "liquid_dist.convert)")
    return model_config_from_dict(json.loads((p / CONFIG_NAME).read_text(encoding="utf-8")))


def weight_files(path: Union[str, Path]) -> list[Path]:
    """The safetensors files of a converted model, in index order."""
    p = Path(path)
    if (p / INDEX_NAME).is_file():
        index = json.loads((p / INDEX_NAME).read_text(encoding="utf-8"))
        names = sorted(set(index["weight_map"].values()))
        missing = [n for n in names if not (p / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{p}: {INDEX_NAME} lists missing shard files {missing}")
        return [p / n for n in names]
    return [p / WEIGHTS_NAME]


def canonical_names(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a converted model stores: each parameter once
    (tied aliases dropped) and the persistent buffers."""
    out = {name: tuple(p.shape) for name, p in model.named_parameters()}
    params = {id(p) for p in model.parameters()}
    for name, t in model.state_dict(keep_vars=True).items():
        if name not in out and id(t) not in params:
            out[name] = tuple(t.shape)
    return out


def check_compatible(cfg: ModelConfig, path: Union[str, Path],
                     key_prefix: str = "model.") -> None:
    """ConfigError unless ``cfg`` describes the same architecture as the model at ``path``.

    Runtime settings (:data:`RUNTIME_FIELDS`: dropout, checkpointing, loss weights,
    kernels) may differ.
    """
    saved = flatten_keys(dataclasses.asdict(read_model_config(path)))
    mine = flatten_keys(dataclasses.asdict(cfg))
    changed = sorted(k for k in saved.keys() | mine.keys()
                     if k not in RUNTIME_FIELDS and saved.get(k) != mine.get(k))
    if changed:
        detail = ", ".join(f"{k}: {mine.get(k)!r} (model {saved.get(k)!r})" for k in changed)
        raise ConfigError(key_prefix + changed[0], mine.get(changed[0]),
                          f"the architecture of the converted model {path} ({detail})")


def load_weights_into(model: nn.Module, path: Union[str, Path],
                      device: Union[str, torch.device] = "cpu") -> None:
    """Copy the weights of a converted model into ``model`` (names and shapes must match).

    Raises ValueError naming missing, unexpected or mis-shaped tensors.
    """
    from safetensors.torch import load_file

    expected = canonical_names(model)
    tensors: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        tensors.update(load_file(str(f), device=str(device)))
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    wrong = sorted(f"{k}: file {tuple(tensors[k].shape)} vs model {expected[k]}"
                   for k in expected.keys() & tensors.keys()
                   if tuple(tensors[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: weights do not match the model: missing {missing}, "
                         f"unexpected {unexpected}, shape mismatches {wrong}")
    with torch.no_grad():
        state = model.state_dict(keep_vars=True)
        for name, t in tensors.items():
            state[name].copy_(t)


def stored_dtype(path: Union[str, Path]) -> Optional[torch.dtype]:
    """The floating dtype of the stored weights (None if they disagree)."""
    from safetensors import safe_open

    dtypes = set()
    for f in weight_files(path):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                t = fh.get_slice(k)
                dtypes.add(t.get_dtype())
    codes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    floats = {codes[d] for d in dtypes if d in codes}
    return floats.pop() if len(floats) == 1 else None


def load_pretrained(cls: type, path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                    dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Build ``cls`` from a converted model directory; eval mode, on ``device``.

    ``dtype`` None keeps the stored precision (fp32 or bf16 export).
    """
    cfg = read_model_config(path)
    device = torch.device(device)
    with device:
        model = cls(cfg)
    load_weights_into(model, path, device=device)
    target = dtype if dtype is not None else stored_dtype(path)
    if target is not None:
        model.to(dtype=target)
    return model.eval()
