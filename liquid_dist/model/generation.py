"""Incremental decoding: caches, greedy / sampling / beam search.

The encoder runs once; each decoder layer's cross-attention K/V are computed
once; every causal module keeps its own state (sliding-window K/V ring
buffer, convolution tails, long-convolution history, LSTM (h, c)), so one
generated token costs one decoder position, not a re-run of the sequence.
All state tensors are batch-first, which lets beam search reorder any of
them with one ``index_select``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .config import ModelConfig


@dataclass
class GenerationConfig:
    """Decoding defaults of a model: ``model.generation_config``, ``generation_config.json``.

    :meth:`LiquidFoundationModelOptimized.generate` uses these fields for every
    setting the call does not pass (a passed value, ``None`` included, wins:
    ``eos_token_id=None`` decodes to ``max_new_tokens`` whatever EOS comes).
    :meth:`from_model_config` derives them from the model config — the defaults a
    fresh model has and that ``python -m liquid_dist.convert`` writes; a model
    loaded with ``from_pretrained`` takes them from its ``generation_config.json``.
    """

    decoder_start_token_id: int
    pad_token_id: int
    eos_token_id: Optional[int]
    """Decoding of a sequence stops at this token (None: never stops early)."""
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    num_beams: int = 1
    suppress_tokens: tuple[int, ...] = ()
    """Ids never generated (Hugging Face's name). A converted model's
    ``generation_config.json`` lists the tokenizer's sentinels, which only span
    filling (decoder start = pad) should write."""

    def __post_init__(self) -> None:
        self.suppress_tokens = tuple(int(i) for i in self.suppress_tokens)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> GenerationConfig:
        """Greedy decoding up to ``max_decoder_length`` tokens with the config's token ids."""
        return cls(decoder_start_token_id=cfg.decoder_start_token_id,
                   pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id,
                   max_new_tokens=cfg.max_decoder_length)

    @classmethod
    def from_dict(cls, values: dict[str, Any], cfg: ModelConfig,
                  source: str = "generation config") -> GenerationConfig:
        """``values`` over :meth:`from_model_config` (a key it lacks keeps that default);
        ValueError naming an unknown key and the known ones."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; expected keys from "
                             f"{list(cls.field_names())}")
        return dataclasses.replace(cls.from_model_config(cfg), **values)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (``suppress_tokens`` a list)."""
        return {**dataclasses.asdict(self), "suppress_tokens": list(self.suppress_tokens)}

    def updated(self, **settings: Any) -> GenerationConfig:
        """A copy with ``settings`` replaced; TypeError naming an unknown setting."""
        unknown = sorted(set(settings) - set(self.field_names()))
        if unknown:
            raise TypeError(f"generate() got unexpected keyword argument(s) {unknown}; the "
                            f"generation settings are {list(self.field_names())}")
        return dataclasses.replace(self, **settings)


def reorder_state(state: Any, index: torch.Tensor) -> Any:
    """Select rows ``index`` of every tensor in a nested state (batch is dim 0)."""
    if isinstance(state, torch.Tensor):
        return state.index_select(0, index)
    if isinstance(state, dict):
        return {k: reorder_state(v, index) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(reorder_state(v, index) for v in state)
    return state


@dataclass
class DecoderCache:
    memory_mask: torch.Tensor | None
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]
    state: dict

    def reorder(self, index: torch.Tensor) -> DecoderCache:
        return DecoderCache(
            memory_mask=reorder_state(self.memory_mask, index),
            cross_kv=reorder_state(self.cross_kv, index),
            state=reorder_state(self.state, index),
        )


class IncrementalDecoder:
    """Runs the decoder of ``model`` one position at a time.

    ``start`` encodes the source; ``step(tokens (B,), pos)`` returns the
    logits (B, vocab) for the next token after feeding ``tokens`` at
    position ``pos``. The logits equal the teacher-forced logits at ``pos``.
    """

    def __init__(self, model):
        self.model = model
        self.decoder = model.decoder
        self.cache: DecoderCache | None = None

    @torch.no_grad()
    def start(self, encoder_input_ids: torch.Tensor,
              encoder_attention_mask: torch.Tensor | None = None) -> None:
        memory, mask, _, _ = self.model.encode(encoder_input_ids, encoder_attention_mask)
        self.start_from_memory(memory, mask)

    @torch.no_grad()
    def start_from_memory(self, memory: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Start from an encoder output already computed: ``memory`` (B, Le, d) and its
        bool mask (None: all real)."""
        b = memory.shape[0]
        dec = self.decoder
        state = {
            "embedding": dec.embedding.init_state(b, memory.device, memory.dtype),
            "blocks": [blk.init_state(b, memory.device, memory.dtype) for blk in dec.blocks],
        }
        if dec.memory is not None:
            state["memory"] = dec.memory.init_state(b, memory.device, memory.dtype)
        cross_kv = [blk.cross_attn.compute_kv(memory) for blk in dec.blocks]
        self.cache = DecoderCache(memory_mask=mask, cross_kv=cross_kv, state=state)

    def reorder(self, index: torch.Tensor) -> None:
        self.cache = self.cache.reorder(index)

    def expand(self, n: int) -> None:
        """Repeat every batch row ``n`` times (row b becomes rows b*n .. b*n+n-1)."""
        k = self.cache.cross_kv[0][0]
        self.reorder(torch.arange(k.shape[0], device=k.device).repeat_interleave(n))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        if pos >= self.model.cfg.max_decoder_length:
            raise ValueError(f"decoder position {pos} >= model.max_decoder_length "
                             f"({self.model.cfg.max_decoder_length})")
        dec, cache = self.decoder, self.cache
        x, emb_state = dec.embedding.step(tokens.view(-1, 1), cache.state["embedding"], pos)
        block_states = []
        for blk, st, kv in zip(dec.blocks, cache.state["blocks"], cache.cross_kv, strict=True):
            x, st = blk.step(x, st, pos, kv, cache.memory_mask)
            block_states.append(st)
        state = {"embedding": emb_state, "blocks": block_states}
        if dec.memory is not None:
            x, state["memory"] = dec.memory.step(x, cache.state["memory"], pos)
        cache.state = state
        return self.model.lm_head(dec.norm(x))[:, -1].float()


def _filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None,
                   top_p: float | None) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; masked entries are -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (always the first token)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def suppress(logits: torch.Tensor, token_ids: tuple[int, ...]) -> torch.Tensor:
    """``logits`` (B, V) with the columns ``token_ids`` set to -inf (never chosen)."""
    if not token_ids:
        return logits
    return logits.index_fill(-1, torch.tensor(token_ids, device=logits.device), float("-inf"))


def choose_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V): argmax, or a filtered sample."""
    if not do_sample:
        return logits.argmax(-1)
    probs = _filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, encoder_input_ids: torch.Tensor,
             encoder_attention_mask: torch.Tensor | None, gen: GenerationConfig,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """See :meth:`LiquidFoundationModelOptimized.generate`; ``gen`` holds every setting."""
    cfg = model.cfg
    max_new_tokens, num_beams, do_sample = gen.max_new_tokens, gen.num_beams, gen.do_sample
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_new_tokens > cfg.max_decoder_length:
        raise ValueError(f"max_new_tokens={max_new_tokens} exceeds model.max_decoder_length "
                         f"({cfg.max_decoder_length})")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams > 1 and do_sample:
        raise ValueError("beam search with sampling is not supported: use do_sample=False")
    was_training = model.training
    model.eval()
    try:
        dec = IncrementalDecoder(model)
        dec.start(encoder_input_ids, encoder_attention_mask)
        if num_beams > 1:
            return _beam_search(model, dec, encoder_input_ids.shape[0], gen)
        return _sample(model, dec, encoder_input_ids.shape[0], gen, generator)
    finally:
        model.train(was_training)


def _sample(model, dec: IncrementalDecoder, batch: int, gen: GenerationConfig,
            generator: torch.Generator | None) -> torch.Tensor:
    device = model.lm_head.weight.device
    tokens = torch.full((batch,), gen.decoder_start_token_id, dtype=torch.long, device=device)
    out = [tokens]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    eos_token_id = gen.eos_token_id
    for pos in range(gen.max_new_tokens):
        logits = suppress(dec.step(tokens, pos), gen.suppress_tokens)
        nxt = choose_next(logits, gen.do_sample, gen.temperature, gen.top_k, gen.top_p,
                          generator)
        nxt = torch.where(finished, torch.full_like(nxt, gen.pad_token_id), nxt)
        out.append(nxt)
        if eos_token_id is not None:
            finished |= nxt == eos_token_id
            if bool(finished.all()):
                break
        tokens = nxt
    return torch.stack(out, dim=1)


def _beam_search(model, dec: IncrementalDecoder, batch: int,
                 gen: GenerationConfig) -> torch.Tensor:
    """Beam search with finished beams carried at constant score; picks the best
    hypothesis by mean log-probability per generated token."""
    device = model.lm_head.weight.device
    nb, eos_token_id = gen.num_beams, gen.eos_token_id
    dec.expand(nb)
    scores = torch.full((batch, nb), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand from the first only
    tokens = torch.full((batch * nb,), gen.decoder_start_token_id, dtype=torch.long,
                        device=device)
    history = tokens.view(-1, 1)
    finished = torch.zeros(batch * nb, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * nb, device=device)
    for pos in range(gen.max_new_tokens):
        logp = F.log_softmax(suppress(dec.step(tokens, pos), gen.suppress_tokens), dim=-1)
        vocab = logp.shape[-1]
        # a finished beam can only continue with pad, at no cost
        pad_row = torch.full_like(logp[0], float("-inf"))
        pad_row[gen.pad_token_id] = 0.0
        logp = torch.where(finished[:, None], pad_row, logp)
        cand = (scores.view(-1, 1) + logp).view(batch, nb * vocab)
        scores, flat = torch.topk(cand, nb, dim=-1)
        src_beam = flat // vocab
        tokens = (flat % vocab).view(-1)
        src = (torch.arange(batch, device=device)[:, None] * nb + src_beam).view(-1)
        dec.reorder(src)
        history = torch.cat([history.index_select(0, src), tokens[:, None]], dim=1)
        was_finished = finished.index_select(0, src)
        lengths = lengths.index_select(0, src) + (~was_finished).float()
        finished = was_finished
        if eos_token_id is not None:
            finished = finished | (tokens == eos_token_id)
            if bool(finished.all()):
                break
    best = (scores.view(-1) / lengths.clamp(min=1)).view(batch, nb).argmax(-1)
    rows = torch.arange(batch, device=device) * nb + best
    return history.index_select(0, rows)
