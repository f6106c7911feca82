"""The model's configuration: :class:`ModelConfig` (with :class:`MoEConfig`), its
validation and the architecture rule of resume and ``train.init_from``.

Part of the model package, which depends on torch and the standard library only: a
converted model directory carries these files as its remote code (liquid_dist.hf).
The run configuration (liquid_dist.config) builds its ``model`` section with the same
typed coercion, :func:`coerce`: every problem is one :class:`ConfigError` naming the
key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A configuration key has a value that cannot work."""

    def __init__(self, key: str, value: Any, expected: str):
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"config key '{key}' = {value!r}: expected {expected}")


@dataclass
class MoEConfig:
    """The MoELayer of every block (seed 3.4)."""

    num_experts: int = 4
    top_k: int = 1
    """k_base of the dynamic-k rule; the fixed k when ``dynamic_k`` is off."""
    dynamic_k: bool = True
    k_max: int = 2
    """Upper bound of the per-token k under dynamic k (the tensor width)."""
    expert_ffn_dim: int = 256
    expert_type: Literal["mlp", "linear"] = "mlp"
    renormalize: bool = False
    """Divide the selected gate probabilities by their sum."""
    backend: Literal["auto", "grouped_mm", "loop", "megablocks"] = "auto"
    """Expert compute; ``auto``: grouped_mm where it is fast (CPU; CUDA bf16), else loop
    (liquid_dist.model.moe.resolve_moe_backend decides, and refuses what cannot work)."""
    overuse_threshold: float = 0.5
    entropy_loss_weight: float = 0.01
    overuse_loss_weight: float = 0.01


ABLATIONS = ("frequency", "compression", "embedding_conv", "deformable_conv", "moe", "lstm")
"""The seed components ``model.ablate`` may remove, in canonical order; each is replaced by
its plain counterpart (docs/model.md, "Ablations"). All of them: a plain pre-LN
encoder-decoder transformer with the same local and cross attention."""


@dataclass
class ModelConfig:
    """LiquidFoundationModelOptimized (docs/model.md)."""

    vocab_size: Union[int, str] = "auto"
    """An int, or ``auto`` to take the tokenizer's size at launch."""
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    ffn_dim: int = 512
    dropout: float = 0.0
    max_encoder_length: int = 128
    max_decoder_length: int = 128
    window: int = 32
    """Local attention reaches ``window`` positions on each allowed side."""
    attention_backend: Literal["auto", "flash", "flex", "blocked", "sdpa"] = "auto"
    embed_kernel_size: int = 3
    freq_heads: int = 4
    band_block: int = 64
    """Largest number of frequency bins one spectral attention call sees."""
    min_compression_ratio: float = 0.5
    base_compression_ratio: float = 1.0
    hyena_filter_dim: int = 32
    """Width of the implicit long-convolution filter MLP of the decoder."""
    conv_kernel_size: int = 3
    max_offset: float = 2.0
    """Bound of the deformable convolution's learned offsets, in positions."""
    lstm_layers: int = 1
    tie_embeddings: bool = True
    recon_loss_weight: float = 0.1
    activation_checkpointing: bool = False
    check_finite: bool = False
    """Strict mode: raise naming the module on the first non-finite activation."""
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 3
    """``generate``'s default decoder start: the prefix-LM start (bos), so that the model
    continues text; span filling starts with the pad id (data/tokenizer.py
    DECODER_START_IDS)."""
    architecture_revision: int = 2
    """The model code's revision whose parameters and initialisation this config means
    (:data:`ARCHITECTURE_REVISIONS`); a saved config without it is revision 1."""
    ablate: list = field(default_factory=list)
    """Names from :data:`ABLATIONS` of the seed components to remove (an architecture key);
    kept in canonical order, so the order written does not matter."""
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        # one spelling per architecture; a bad list is left as written for validate_model
        if (isinstance(self.ablate, list) and all(isinstance(n, str) for n in self.ablate)
                and set(self.ablate) <= set(ABLATIONS)):
            self.ablate = sorted(self.ablate, key=ABLATIONS.index)

    def keeps(self, component: str) -> bool:
        """False when ``model.ablate`` removes ``component`` (a name from :data:`ABLATIONS`)."""
        if component not in ABLATIONS:
            raise ValueError(f"unknown component {component!r}; expected one of {ABLATIONS}")
        return component not in self.ablate


# ---------------------------------------------------------------- type checks


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError; never guesses."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(key, value, _type_name(tp))
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(key, value, _type_name(tp))
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(key, value, "null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, value, f"a mapping of {tp.__name__} fields")
        return build_dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "a boolean (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, value, "an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "3e-4" (no dot) as a string; it is still plainly a number
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)
        raise ConfigError(key, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, value, "a string")
    if tp is list:
        if isinstance(value, list):
            return value
        raise ConfigError(key, value, "a list")
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(key, value, "a mapping")
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def build_dataclass(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            raise ConfigError(
                f"{prefix}.{k}" if prefix else str(k),
                values[k],
                f"no such key; known keys of '{prefix or 'config'}': {sorted(names)}",
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in values:
            kwargs[f.name] = coerce(key, values[f.name], hints[f.name])
    return cls(**kwargs)


# ------------------------------------------------------------ cross checks


def check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(key, value, "a value > 0")


ARCHITECTURE_REVISIONS = {
    1: "the seed's components at full strength from initialisation",
    2: "identity-preserving initialisation and placement (docs/model.md, "
       "'Initialisation'): zero-gain residual branches in the embeddings, the Hyena "
       "short convolution, the LSTM pre-norm, per-objective decoder start tokens",
}
"""What each ``model.architecture_revision`` means; this code builds the last one."""


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    """Raise ConfigError for a model section that cannot be built."""
    current = max(ARCHITECTURE_REVISIONS)
    if m.architecture_revision != current:
        raise ConfigError(
            f"{prefix}.architecture_revision", m.architecture_revision,
            f"{current}: this model was saved by an older liquid_dist (revision "
            f"{m.architecture_revision}: "
            f"{ARCHITECTURE_REVISIONS.get(m.architecture_revision, 'unknown')}); revision "
            f"{current} ({ARCHITECTURE_REVISIONS[current]}) has other parameters and "
            "another initialisation, so these weights cannot be loaded: train anew, or "
            "use the liquid_dist release that wrote them")
    if isinstance(m.vocab_size, str) and m.vocab_size != "auto":
        raise ConfigError(f"{prefix}.vocab_size", m.vocab_size, "an integer or 'auto'")
    if isinstance(m.vocab_size, int) and m.vocab_size < 8:
        raise ConfigError(f"{prefix}.vocab_size", m.vocab_size, "an integer >= 8")
    for name in ("d_model", "n_heads", "n_kv_heads", "ffn_dim", "max_encoder_length",
                 "max_decoder_length", "embed_kernel_size", "freq_heads", "band_block",
                 "hyena_filter_dim", "conv_kernel_size", "lstm_layers"):
        check_positive(f"{prefix}.{name}", getattr(m, name))
    for name in ("n_encoder_layers", "n_decoder_layers"):
        if getattr(m, name) < 1:
            raise ConfigError(f"{prefix}.{name}", getattr(m, name), "an integer >= 1")
    if m.window < 1:
        raise ConfigError(f"{prefix}.window", m.window, "an integer >= 1")
    if m.d_model % m.n_heads:
        raise ConfigError(f"{prefix}.d_model", m.d_model,
                          f"a multiple of model.n_heads ({m.n_heads})")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"{prefix}.n_kv_heads", m.n_kv_heads,
                          f"a divisor of model.n_heads ({m.n_heads})")
    if m.d_model % m.freq_heads:
        raise ConfigError(f"{prefix}.freq_heads", m.freq_heads,
                          f"a divisor of model.d_model ({m.d_model})")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"{prefix}.n_heads", m.n_heads,
                          "a head count giving an even head dimension d_model / n_heads")
    if m.embed_kernel_size % 2 == 0:
        raise ConfigError(f"{prefix}.embed_kernel_size", m.embed_kernel_size, "an odd integer")
    if m.conv_kernel_size % 2 == 0:
        raise ConfigError(f"{prefix}.conv_kernel_size", m.conv_kernel_size, "an odd integer")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"{prefix}.dropout", m.dropout, "a probability in [0, 1)")
    if not 0.0 < m.min_compression_ratio <= m.base_compression_ratio <= 1.0:
        raise ConfigError(
            f"{prefix}.min_compression_ratio", m.min_compression_ratio,
            "0 < min_compression_ratio <= base_compression_ratio "
            f"({m.base_compression_ratio}) <= 1",
        )
    if m.max_offset < 0:
        raise ConfigError(f"{prefix}.max_offset", m.max_offset, "a value >= 0")
    if m.recon_loss_weight < 0:
        raise ConfigError(f"{prefix}.recon_loss_weight", m.recon_loss_weight, "a value >= 0")
    e = m.moe
    p = f"{prefix}.moe"
    if e.num_experts < 1:
        raise ConfigError(f"{p}.num_experts", e.num_experts, "an integer >= 1")
    if not 1 <= e.top_k <= e.num_experts:
        raise ConfigError(f"{p}.top_k", e.top_k,
                          f"an integer in [1, moe.num_experts={e.num_experts}]")
    if e.dynamic_k and not e.top_k <= e.k_max <= e.num_experts:
        raise ConfigError(f"{p}.k_max", e.k_max,
                          f"an integer in [moe.top_k={e.top_k}, moe.num_experts={e.num_experts}]")
    check_positive(f"{p}.expert_ffn_dim", e.expert_ffn_dim)
    if not 0.0 < e.overuse_threshold <= 1.0:
        raise ConfigError(f"{p}.overuse_threshold", e.overuse_threshold, "a fraction in (0, 1]")
    for name in ("entropy_loss_weight", "overuse_loss_weight"):
        if getattr(e, name) < 0:
            raise ConfigError(f"{p}.{name}", getattr(e, name), "a value >= 0")
    for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
        v = getattr(m, name)
        if v < 0 or (isinstance(m.vocab_size, int) and v >= m.vocab_size):
            raise ConfigError(f"{prefix}.{name}", v,
                              f"a token id in [0, vocab_size={m.vocab_size})")
    valid = f"a list of distinct names from {list(ABLATIONS)}"
    if not isinstance(m.ablate, list):
        raise ConfigError(f"{prefix}.ablate", m.ablate, valid)
    for name in m.ablate:
        if not isinstance(name, str) or name not in ABLATIONS:
            raise ConfigError(f"{prefix}.ablate", m.ablate, f"{valid}; {name!r} is not one")
        if m.ablate.count(name) > 1:
            raise ConfigError(f"{prefix}.ablate", m.ablate, f"{valid}; {name!r} is repeated")


def model_config_from_dict(tree: dict) -> ModelConfig:
    """Build and validate a ModelConfig alone from a saved one (config.json, a checkpoint's
    config): a saved config without ``architecture_revision`` is revision 1."""
    m = coerce("model", {"architecture_revision": 1, **tree}, ModelConfig)
    validate_model(m)
    return m


def flatten_keys(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (keys prefixed with ``prefix``)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


RUN_SETTINGS = frozenset({
    "dropout", "activation_checkpointing", "check_finite", "recon_loss_weight",
    "attention_backend", "moe.backend", "moe.entropy_loss_weight", "moe.overuse_loss_weight",
    "moe.overuse_threshold",
})
"""Keys of ``model`` that say how the model runs, not what it is: regularisation, loss
weights, kernels, memory and checks. They may change on resume and ``train.init_from``;
every other ``model`` key is the architecture (docs/training.md)."""


def architecture(model: Union[ModelConfig, dict]) -> dict[str, Any]:
    """The architecture keys of a model config (flat, dotted) and their values.

    A dict (a saved config) is completed with the defaults and validated first.
    """
    if isinstance(model, dict):
        model = model_config_from_dict(model)
    flat = flatten_keys(dataclasses.asdict(model))
    return {k: v for k, v in flat.items() if k not in RUN_SETTINGS}


def check_same_architecture(saved: Union[ModelConfig, dict], mine: Union[ModelConfig, dict],
                            source: str) -> None:
    """ConfigError naming the first architecture key of ``mine`` that differs from ``saved``.

    ``source`` says where ``saved`` comes from (a checkpoint, a converted model).
    The one compatibility rule of resume and ``train.init_from``: run settings
    (:data:`RUN_SETTINGS`) may differ, nothing else.
    """
    old, new = architecture(saved), architecture(mine)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        detail = ", ".join(f"model.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ConfigError(f"model.{changed[0]}", new.get(changed[0]),
                          f"{old.get(changed[0])!r}, the architecture of {source} ({detail}); "
                          "only run settings may change ("
                          + ", ".join(f"model.{k}" for k in sorted(RUN_SETTINGS)) + ")")


def next_power_of_two(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))
