"""The ``transformers`` configuration of LiquidFoundationModelOptimized (remote code).

A model directory written by this project (``python -m liquid_dist.convert``,
``save_pretrained``) carries this file, ``modeling_liquid_foundation.py`` and the
model package's own modules beside its weights; ``config.json`` names them in its
``auto_map``, so ``AutoConfig`` / ``AutoModelForSeq2SeqLM.from_pretrained(DIR,
trust_remote_code=True)`` work where ``transformers`` and ``torch`` are installed and
this project is not (docs/evaluation.md, "Hugging Face"). Not imported by the
package itself: only this file and the modeling file need ``transformers``.

The configuration is the model's :class:`~.config.ModelConfig`, flat, as the
project writes it: every ``ModelConfig`` key is read, typed and validated by the
project's own rules; the other keys are ``transformers``'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

try:
    from transformers import PretrainedConfig
except ImportError as exc:  # the project's own paths never import this file
    raise ImportError("the transformers classes of a model directory need transformers: "
                      "pip install 'liquid_dist[hf]'") from exc

from .config import ModelConfig, model_config_from_dict

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


class LiquidFoundationConfig(PretrainedConfig):
    """``transformers`` view of a :class:`~.config.ModelConfig`: its fields are the
    attributes (``moe`` a mapping), plus the standard names ``hidden_size``,
    ``num_attention_heads``, ``num_key_value_heads``, ``num_hidden_layers`` (the
    decoder's), ``max_position_embeddings`` (the encoder's length) and
    ``tie_word_embeddings``."""

    model_type = "liquid_foundation"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "num_hidden_layers": "n_decoder_layers",
        "max_position_embeddings": "max_encoder_length",
        "tie_word_embeddings": "tie_embeddings",
    }

    def __init__(self, **kwargs: Any):
        own = {k: kwargs.pop(k) for k in MODEL_FIELDS if k in kwargs}
        # a saved config is read with the project's rules (revision 1 when it has none);
        # no keys at all is a fresh ModelConfig (transformers builds one to diff against)
        cfg = model_config_from_dict(own) if own else ModelConfig()
        for name, value in dataclasses.asdict(cfg).items():
            setattr(self, name, value)
        kwargs["is_encoder_decoder"] = True
        super().__init__(**kwargs)

    def to_diff_dict(self) -> dict[str, Any]:
        """What ``save_pretrained`` writes: ``transformers``'s changed keys and every
        ModelConfig key (a default left out would read back as another revision's)."""
        return {**super().to_diff_dict(), **{name: getattr(self, name) for name in MODEL_FIELDS}}

    def to_model_config(self) -> ModelConfig:
        """The validated :class:`~.config.ModelConfig` these attributes describe."""
        return model_config_from_dict({name: getattr(self, name) for name in MODEL_FIELDS})
