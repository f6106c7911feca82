"""Text from a trained checkpoint: a plain model, a validation prompt, greedy and top-p.

    python launch/sample.py --checkpoint runs/tiny [--num 2] [--max-new-tokens 48] [--top-p 0.9]

Single process, no DeepSpeed engine: the weights are read whole from the rank
files by liquid_dist.checkpoint_format (any world size and ep_size).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from liquid_dist.convert import load_trained_model


def _text(tok: Any, ids: torch.Tensor) -> str:
    keep = [int(i) for i in ids if int(i) not in (-100, tok.pad_id, tok.eos_id)]
    return tok.decode(keep)


def validation_samples(checkpoint: str | Path, *, num: int = 1, max_new_tokens: int = 48,
                       top_p: float = 0.9, seed: int = 0) -> list[dict[str, str]]:
    """Continuations of ``num`` prefix-LM prompts from the validation shards.

    Decoding starts with the prefix-LM start token and never writes a sentinel, as a
    converted model's defaults do. Returns dicts with ``prompt`` (the encoder input),
    ``reference`` (the true continuation), ``greedy`` and ``sampled`` (nucleus
    sampling with ``top_p`` at temperature 1, from a generator seeded with
    ``seed``: the same text every run), all detokenised.
    """
    from liquid_dist.data import Tokenizer, build_val_loader

    model, cfg = load_trained_model(checkpoint)
    data = dataclasses.replace(cfg.data, objective="prefix_lm", num_workers=0)
    tok = Tokenizer(data.tokenizer)
    # text mode, as a converted model decodes: no sentinel (docs/model.md, "Generation modes")
    model.generation_config = model.generation_config.updated(suppress_tokens=tok.sentinel_ids)
    batch = next(iter(build_val_loader(data, rank=0, world_size=1, batch_size=num,
                                       seed=cfg.train.seed, num_batches=1)))
    steps = min(max_new_tokens, cfg.model.max_decoder_length)
    prompt = (batch["encoder_input_ids"], batch["encoder_attention_mask"])
    greedy = model.generate(*prompt, max_new_tokens=steps, eos_token_id=tok.eos_id)
    sampled = model.generate(*prompt, max_new_tokens=steps, eos_token_id=tok.eos_id,
                             do_sample=True, top_p=top_p,
                             generator=torch.Generator().manual_seed(seed))
    return [{"prompt": _text(tok, batch["encoder_input_ids"][i]),
             "reference": _text(tok, batch["labels"][i][:steps]),
             "greedy": _text(tok, greedy[i, 1:]),
             "sampled": _text(tok, sampled[i, 1:])} for i in range(num)]
