"""The single-GPU format: a directory of safetensors weights plus the model config.

Layout of a converted model (written by ``python -m liquid_dist.convert``)::

    config.json                  the ModelConfig, as a flat JSON object, and transformers' keys
    model.safetensors            every weight once, original names (no ``model.`` prefix)
      or model-0000i-of-0000N.safetensors + model.safetensors.index.json (weight_map)
    *.py                         this package's modules: the remote code of config.json's auto_map
    tokenizer.model              the sentencepiece model the run was trained with
    tokenizer.json, tokenizer_config.json   the same tokenizer for transformers
    generation_config.json       decoding defaults for ``liquid_dist.generate`` and transformers
    README.md                    model card

Tied weights are stored once under their canonical name (the first name
``named_parameters()`` gives, e.g. ``token_embedding.weight``); the model
re-ties them itself when built from ``config.json`` (``tie_embeddings``), so
loading needs nothing but this directory: safetensors only, no pickle, no
DeepSpeed. :func:`save_pretrained` writes the same layout (one weights file,
no model card) from a model in memory. The same directory loads with
``transformers`` (``AutoModelForSeq2SeqLM.from_pretrained(DIR, trust_remote_code=True)``:
modeling_liquid_foundation.py), whose ``save_pretrained`` writes it back readable here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .config import ModelConfig, check_same_architecture, model_config_from_dict
from .generation import GenerationConfig
from .init import PerExpert, Rule, Source, init_parameters

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"
MODEL_CARD_NAME = "README.md"

MODEL_TYPE = "liquid_foundation"
AUTO_MAP = {
    "AutoConfig": "configuration_liquid_foundation.LiquidFoundationConfig",
    "AutoModelForSeq2SeqLM": "modeling_liquid_foundation.LiquidFoundationForConditionalGeneration",
}
"""The remote code of a model directory (``transformers``'s ``auto_map``): the two files
name the classes; they and every module of this package they import are copied in."""
TRANSFORMERS_KEYS = frozenset({"model_type", "architectures", "auto_map", "transformers_version",
                               "dtype", "torch_dtype", "is_encoder_decoder"})
"""Keys of ``config.json`` that are ``transformers``'s, not the ModelConfig's."""
TRANSFORMERS_GENERATION_KEYS = frozenset({"transformers_version", "_from_model_config"})
"""Keys ``transformers`` adds to a ``generation_config.json`` it saves: not settings."""


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
    tree = json.loads((p / CONFIG_NAME).read_text(encoding="utf-8"))
    if tree.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ValueError(f"{p / CONFIG_NAME}: model_type {tree['model_type']!r}, expected "
                         f"{MODEL_TYPE!r}: not a liquid_dist model")
    return model_config_from_dict({k: v for k, v in tree.items() if k not in TRANSFORMERS_KEYS})


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


def check_compatible(cfg: ModelConfig, path: Union[str, Path]) -> None:
    """ConfigError unless ``cfg`` describes the same architecture as the model at ``path``
    (:func:`liquid_dist.config.check_same_architecture`: run settings may differ)."""
    check_same_architecture(read_model_config(path), cfg, f"the converted model {path}")


def weight_source(path: Union[str, Path], expected: dict[str, tuple[int, ...]]) -> Source:
    """The tensors of a converted model, read one at a time (memory-mapped), as an
    :func:`~liquid_dist.model.init.init_parameters` source; an expert tensor holding a
    slice of the experts (expert parallelism) reads only its rows.

    ``expected``: name -> full shape (:func:`canonical_names` of the whole model).
    Raises ValueError naming missing, unexpected or mis-shaped tensors before
    anything is read.
    """
    from safetensors import safe_open

    handles, shapes = {}, {}
    for f in weight_files(path):
        handle = safe_open(str(f), framework="pt")
        for name in handle.keys():
            handles[name] = handle
            shapes[name] = tuple(handle.get_slice(name).get_shape())
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    wrong = sorted(f"{k}: file {shapes[k]} vs model {expected[k]}"
                   for k in expected.keys() & shapes.keys() if shapes[k] != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: weights do not match the model: missing {missing}, "
                         f"unexpected {unexpected}, shape mismatches {wrong}")

    def source(name: str, param: nn.Parameter, rule: Rule) -> torch.Tensor:
        # a copy: the tensor safetensors returns lives in the file's private mapping, where
        # a write (ZeRO-3's broadcast into it on the receiving ranks) would copy every
        # touched page for as long as the file stays open
        if isinstance(rule, PerExpert) and param.shape[0] != shapes[name][0]:
            return handles[name].get_slice(name)[
                rule.offset:rule.offset + param.shape[0]].clone()
        return handles[name].get_tensor(name).clone()

    return source


def load_weights_into(model: nn.Module, path: Union[str, Path],
                      device: Union[str, torch.device] = "cpu") -> None:
    """Give ``model`` (built whole, or on the meta device) the weights of a converted
    model, one tensor at a time (names and shapes must match: :func:`weight_source`)."""
    init_parameters(model, 0, source=weight_source(path, canonical_names(model)),
                    device=device)


def write_model_config(cfg: ModelConfig, path: Union[str, Path],
                       dtype: torch.dtype = torch.float32) -> None:
    """``config.json`` of a model directory: the ModelConfig, flat, after the keys that
    make it a ``transformers`` configuration (``dtype``: the stored weights')."""
    tree = {"model_type": MODEL_TYPE, "architectures": [AUTO_MAP["AutoModelForSeq2SeqLM"]
                                                        .rsplit(".", 1)[1]],
            "auto_map": AUTO_MAP, "is_encoder_decoder": True,
            "dtype": str(dtype).removeprefix("torch."), **dataclasses.asdict(cfg)}
    (Path(path) / CONFIG_NAME).write_text(json.dumps(tree, indent=2) + "\n", encoding="utf-8")


def remote_code_files() -> list[Path]:
    """The files a model directory carries as its remote code: every module of this
    package but ``__init__.py`` (the configuration and modeling files of
    :data:`AUTO_MAP` and all they import, flat, as ``transformers`` wants them)."""
    return sorted(f for f in Path(__file__).parent.glob("*.py") if f.name != "__init__.py")


def write_remote_code(path: Union[str, Path]) -> None:
    """Copy :func:`remote_code_files` into the model directory ``path``, as they are."""
    for f in remote_code_files():
        shutil.copyfile(f, Path(path) / f.name)


def write_generation_config(gen: GenerationConfig, path: Union[str, Path]) -> None:
    """``generation_config.json`` of a model directory."""
    (Path(path) / GENERATION_CONFIG_NAME).write_text(json.dumps(gen.to_dict(), indent=2) + "\n",
                                                     encoding="utf-8")


def read_generation_config(path: Union[str, Path], cfg: ModelConfig) -> GenerationConfig:
    """The decoding defaults of a model directory: its ``generation_config.json`` over
    :meth:`GenerationConfig.from_model_config` (all of those without the file)."""
    f = Path(path) / GENERATION_CONFIG_NAME
    if not f.is_file():
        return GenerationConfig.from_model_config(cfg)
    values = json.loads(f.read_text(encoding="utf-8"))
    settings = {k: v for k, v in values.items() if k not in TRANSFORMERS_GENERATION_KEYS}
    return GenerationConfig.from_dict(settings, cfg, source=str(f))


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Alias name -> canonical name of every parameter registered under several names."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical = first.setdefault(id(p), name)
        if canonical != name:
            out[name] = canonical
    return out


def save_pretrained(model: nn.Module, path: Union[str, Path]) -> Path:
    """Write ``model`` (a whole LiquidFoundationModelOptimized in memory, not a ZeRO-3
    partitioned one: convert a checkpoint with ``python -m liquid_dist.convert``) as
    the directory :func:`load_pretrained` reads; see its ``save_pretrained`` method."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict(keep_vars=True)
    tensors = {name: state[name].detach().to("cpu").contiguous()
               for name in canonical_names(model)}
    # a sharded export left in the directory would be read instead of the new weights
    for stale in [out / INDEX_NAME, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    metadata = {"format": "pt", "tied_weights": json.dumps(tied_aliases(model), sort_keys=True)}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata=metadata)
    dtype = stored_dtype(out) or torch.float32
    write_model_config(model.cfg, out, dtype)
    write_generation_config(model.generation_config, out)
    write_remote_code(out)
    return out


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
    """Build ``cls`` from a converted model directory; eval mode, on ``device``, with the
    directory's decoding defaults (:func:`read_generation_config`) as ``generation_config``.

    ``dtype`` None keeps the stored precision (fp32 or bf16 export).
    """
    cfg = read_model_config(path)
    generation_config = read_generation_config(path, cfg)
    with torch.device("meta"):
        model = cls(cfg)
    load_weights_into(model, path, device=device)
    model.generation_config = generation_config
    target = dtype if dtype is not None else stored_dtype(path)
    if target is not None:
        model.to(dtype=target)
    return model.eval()
