"""Launch-time checks that need files: the tokenizer decides ``model.vocab_size: auto``.

Everything here runs before any process group exists, so a bad config or a
missing file stops every rank with one clear message and nothing to clean up.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import torch

from liquid_dist.checkpoint_format import find_checkpoint, read_config
from liquid_dist.config import Config, ConfigError, check_same_architecture, validate
from liquid_dist.model.moe import resolve_moe_backend
from liquid_dist.model.pretrained import check_compatible, is_pretrained_dir
from liquid_dist.parallel.deepspeed_config import check_supported, resolve_precision


def resolve_config(cfg: Config) -> Config:
    """A copy of ``cfg`` with ``model.vocab_size`` an integer, checked against the tokenizer.

    ``auto`` takes the tokenizer's size; an explicit size below it is a
    ConfigError (ids past the embedding would crash mid-run), as are special
    token ids that differ from the tokenizer's and settings this engine does
    not run (an ``ep_size`` that does not divide the world size, fp16 without a
    GPU, an MoE backend without a kernel for this device and precision).
    """
    from liquid_dist.data import Tokenizer
    from liquid_dist.data.tokenizer import DECODER_START_IDS

    check_supported(cfg)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    resolve_moe_backend(cfg.model.moe, device_type, resolve_precision(cfg.train, device_type))
    if cfg.train.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.wandb.mode", cfg.train.wandb.mode,
                          "'disabled' unless wandb is installed (pip install wandb)")
    tok_path = Path(cfg.data.tokenizer)
    if not tok_path.is_file():
        raise ConfigError("data.tokenizer", cfg.data.tokenizer,
                          "an existing sentencepiece model file (data_prep/train_tokenizer.py "
                          "writes one; scripts/demo.sh prepares the Shakespeare one)")
    tok = Tokenizer(tok_path)
    m = cfg.model
    if m.vocab_size == "auto":
        vocab = tok.vocab_size
    else:
        vocab = int(m.vocab_size)
        if vocab < tok.vocab_size:
            raise ConfigError("model.vocab_size", vocab,
                              f"'auto' or an integer >= the tokenizer's vocabulary "
                              f"({tok.vocab_size}, {tok_path})")
    for name, tok_id in (("pad_token_id", tok.pad_id), ("eos_token_id", tok.eos_id),
                         ("decoder_start_token_id", DECODER_START_IDS["prefix_lm"])):
        if getattr(m, name) != tok_id:
            raise ConfigError(f"model.{name}", getattr(m, name),
                              f"{tok_id}, the id the tokenizer and the data loader use")
    out = dataclasses.replace(cfg, model=dataclasses.replace(m, vocab_size=vocab))
    validate(out)
    # the model to start from must have this architecture (ConfigError)
    if out.train.init_from and is_pretrained_dir(out.train.init_from):
        check_compatible(out.model, out.train.init_from)
    elif out.train.init_from:
        ref = find_checkpoint(out.train.init_from, out.train.init_from)
        assert ref is not None
        check_same_architecture(read_config(ref)["model"], out.model,
                                f"the train.init_from checkpoint {ref.path}")
    return out
