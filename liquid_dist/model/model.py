"""BidirectionalEncoder, LiquidDecoder and LiquidFoundationModelOptimized (seed 3.9–3.10)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError, ModelConfig, validate_model
from .attention import AttentionMaskPlan
from .block import AuxDict, ImprovedTransformerBlock
from .embedding import EnhancedLiquidEmbedding
from .memory import EnhancedLSTM
from .utils import check_finite


@dataclass
class ModelOutput:
    """What :meth:`LiquidFoundationModelOptimized.forward` returns.

    * ``logits`` (B, L_dec, vocab);
    * ``loss``: the total training loss ``ce + aux_loss`` (None without labels);
    * ``aux``: named unweighted scalar tensors ``ce`` (with labels),
      ``recon_encoder``, ``recon_decoder``, ``moe_entropy``, ``moe_overuse``
      (the last two summed over layers), and ``nonfinite_activations``: int64,
      the number of NaN/±Inf activation values the blocks replaced by 0 in
      this forward (summed over blocks; 0 in a healthy pass; not a loss term,
      no host sync) — a step where it is > 0 trained on repaired activations;
    * ``expert_usage``: one (experts,) tensor of hard assignment fractions per
      MoE layer, encoder layers first;
    * ``ce_sum``: fp32 scalar, the sum of the per-token cross-entropy over the
      real targets (labels != -100), differentiable; None without labels;
    * ``num_targets``: int64 scalar tensor, the number of labels != -100; None
      without labels. ``ce = ce_sum / max(num_targets, 1)``;
    * ``aux_loss``: fp32 scalar, differentiable, always set: the weighted sum
      ``recon_loss_weight * (recon_encoder + recon_decoder) +
      entropy_loss_weight * moe_entropy + overuse_loss_weight * moe_overuse``.

    ``ce_sum`` and ``num_targets`` let a trainer weight the cross-entropy by
    tokens across micro-batches and ranks, with ``aux_loss`` added per batch.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    expert_usage: list[torch.Tensor] = field(default_factory=list)
    ce_sum: torch.Tensor | None = None
    num_targets: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def _run_blocks(
    blocks: nn.ModuleList, x: torch.Tensor, use_checkpoint: bool, **kwargs
) -> tuple[torch.Tensor, list[AuxDict]]:
    auxes = []
    for block in blocks:
        if use_checkpoint and torch.is_grad_enabled():
            x, aux = checkpoint(block, x, use_reentrant=False, **kwargs)
        else:
            x, aux = block(x, **kwargs)
        auxes.append(aux)
    return x, auxes


class BidirectionalEncoder(nn.Module):
    """Embedding → dropout → non-causal blocks → LayerNorm.

    ``forward(input_ids (B, L), mask (B, L) bool)`` returns the encoder output
    (B, L, d), its reconstruction loss and the blocks' MoE auxiliary dicts.
    All blocks of one forward share one self-attention
    :class:`~liquid_dist.model.attention.AttentionMaskPlan` of ``mask``
    (validating flash's precondition in strict mode only).
    """

    def __init__(self, cfg: ModelConfig, token_embedding: nn.Embedding):
        super().__init__()
        self.cfg = cfg
        self.embedding = EnhancedLiquidEmbedding(cfg, token_embedding, causal=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            ImprovedTransformerBlock(cfg, causal=False, name=f"encoder.blocks.{i}")
            for i in range(cfg.n_encoder_layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[AuxDict]]:
        x, recon = self.embedding(input_ids, mask)
        x = self.dropout(x)
        plan = AttentionMaskPlan(mask, validate=self.cfg.check_finite)
        x, auxes = _run_blocks(self.blocks, x, self.cfg.activation_checkpointing,
                               mask=mask, plan=plan)
        return self.norm(x), recon, auxes


class LiquidDecoder(nn.Module):
    """Causal embedding → dropout → cross-attending causal blocks → EnhancedLSTM → LayerNorm.

    The seed writes y_t = Decoder(y_<t, H_e) without naming the module; the
    LSTM is the decoder's external memory and runs once after the stack.
    """

    def __init__(self, cfg: ModelConfig, token_embedding: nn.Embedding):
        super().__init__()
        self.cfg = cfg
        self.embedding = EnhancedLiquidEmbedding(cfg, token_embedding, causal=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            ImprovedTransformerBlock(cfg, causal=True, name=f"decoder.blocks.{i}")
            for i in range(cfg.n_decoder_layers)
        )
        self.memory = EnhancedLSTM(cfg)
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(
        self,
        input_ids: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[AuxDict]]:
        """input_ids (B, L), memory (B, Le, d) with memory_mask (B, Le), mask (B, L).

        Masks are bool, True = real token, or None (all real). Returns the
        hidden states (B, L, d), the reconstruction loss over real positions
        and the blocks' MoE auxiliary dicts. All blocks share one
        self-attention :class:`~liquid_dist.model.attention.AttentionMaskPlan`
        of ``mask`` (validating flash's precondition in strict mode only).
        """
        x, recon = self.embedding(input_ids, mask)
        x = self.dropout(x)
        x, auxes = _run_blocks(
            self.blocks, x, self.cfg.activation_checkpointing,
            mask=mask, memory=memory, memory_mask=memory_mask,
            plan=AttentionMaskPlan(mask, validate=self.cfg.check_finite),
        )
        x = self.memory(x)
        return self.norm(x), recon, auxes


class LiquidFoundationModelOptimized(nn.Module):
    """The encoder-decoder language model of the seed.

    ``forward(encoder_input_ids, decoder_input_ids, encoder_attention_mask=None,
    labels=None, decoder_attention_mask=None)`` returns a :class:`ModelOutput`.
    Labels equal to -100 are ignored. ``generate`` decodes incrementally (see
    generation.py).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg.vocab_size, int):
            raise ConfigError("model.vocab_size", cfg.vocab_size,
                              "an integer (resolve 'auto' from the tokenizer before building)")
        validate_model(cfg)
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.token_embedding.weight, std=cfg.d_model ** -0.5)
        self.encoder = BidirectionalEncoder(cfg, self.token_embedding)
        self.decoder = LiquidDecoder(cfg, self.token_embedding)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=True)
        nn.init.zeros_(self.lm_head.bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        else:
            nn.init.xavier_normal_(self.lm_head.weight)

    def _check_ids(self, name: str, ids: torch.Tensor, max_len: int) -> None:
        if ids.dim() != 2:
            raise ValueError(f"{name} must be (batch, length), got shape {tuple(ids.shape)}")
        if ids.shape[1] > max_len:
            raise ValueError(f"{name} has length {ids.shape[1]} > the configured maximum {max_len}")

    @staticmethod
    def _mask(name: str, mask: torch.Tensor | None, ids_name: str,
              ids: torch.Tensor) -> torch.Tensor | None:
        """``mask`` as bool (True = real), after checking it is shaped like ``ids``."""
        if mask is None:
            return None
        if mask.shape != ids.shape:
            raise ValueError(f"{name} shape {tuple(mask.shape)} != {ids_name} "
                             f"shape {tuple(ids.shape)}")
        return mask.bool()

    def encode(
        self, encoder_input_ids: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[AuxDict]]:
        """Run the encoder: returns (memory (B, Le, d), bool mask or None, recon, aux list)."""
        self._check_ids("encoder_input_ids", encoder_input_ids, self.cfg.max_encoder_length)
        mask = self._mask("encoder_attention_mask", encoder_attention_mask,
                          "encoder_input_ids", encoder_input_ids)
        memory, recon, auxes = self.encoder(encoder_input_ids, mask)
        return memory, mask, recon, auxes

    def forward(
        self,
        encoder_input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Teacher-forced forward pass; see :class:`ModelOutput`.

        Masks are (B, L) bool or int, True / 1 = real token. Without
        ``decoder_attention_mask``, decoder position i is real iff
        ``labels[:, i] != -100`` (all real without labels); pass it when -100
        also marks real tokens that are not scored. Padding, on either side,
        is zeroed before every sequence-mixing operation of the embeddings and
        blocks and gets no expert: no logit, loss term or expert statistic
        depends on what padding holds, and the loss terms count real
        positions only.
        """
        self._check_ids("decoder_input_ids", decoder_input_ids, self.cfg.max_decoder_length)
        if labels is not None and labels.shape != decoder_input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != decoder_input_ids "
                             f"shape {tuple(decoder_input_ids.shape)}")
        dec_mask = self._mask("decoder_attention_mask", decoder_attention_mask,
                              "decoder_input_ids", decoder_input_ids)
        if dec_mask is None and labels is not None:
            dec_mask = labels != -100
        memory, enc_mask, recon_enc, enc_aux = self.encode(
            encoder_input_ids, encoder_attention_mask)
        hidden, recon_dec, dec_aux = self.decoder(decoder_input_ids, memory, enc_mask, dec_mask)
        logits = check_finite("lm_head", self.lm_head(hidden), self.cfg.check_finite)

        auxes = enc_aux + dec_aux
        zero = logits.new_zeros((), dtype=torch.float32)
        aux = {
            "recon_encoder": recon_enc.float(),
            "recon_decoder": recon_dec.float(),
            "moe_entropy": sum((a["moe_entropy"].float() for a in auxes), zero),
            "moe_overuse": sum((a["moe_overuse"].float() for a in auxes), zero),
            "nonfinite_activations": sum((a["nonfinite"] for a in auxes),
                                         zero.to(torch.int64)),
        }
        m = self.cfg.moe
        aux_loss = (
            self.cfg.recon_loss_weight * (aux["recon_encoder"] + aux["recon_decoder"])
            + m.entropy_loss_weight * aux["moe_entropy"]
            + m.overuse_loss_weight * aux["moe_overuse"]
        )
        out = ModelOutput(logits=logits, aux=aux, aux_loss=aux_loss,
                          expert_usage=[a["expert_usage"] for a in auxes])
        if labels is not None:
            out.ce_sum = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=-100, reduction="sum",
            )
            out.num_targets = (labels != -100).sum()
            aux["ce"] = out.ce_sum / out.num_targets.clamp(min=1)
            out.loss = aux["ce"] + aux_loss
        return out

    @torch.no_grad()
    def generate(
        self,
        encoder_input_ids: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        num_beams: int = 1,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decode up to ``max_new_tokens`` tokens; returns (B, 1 + generated) ids.

        The first column is the decoder start token. Sequences that reached
        ``eos_token_id`` are filled with the pad id afterwards; decoding stops
        early once every sequence has finished.
        """
        from .generation import generate

        return generate(
            self, encoder_input_ids, encoder_attention_mask, max_new_tokens=max_new_tokens,
            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            num_beams=num_beams, eos_token_id=eos_token_id, generator=generator,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> LiquidFoundationModelOptimized:
        """Load a converted model directory (``python -m liquid_dist.convert``), in eval mode.

        Safetensors only (no pickle, no DeepSpeed); tied weights are re-tied
        from the config. ``dtype`` None keeps the stored precision.
        """
        from .pretrained import load_pretrained

        return load_pretrained(cls, path, device=device, dtype=dtype)

    def num_parameters(self) -> dict[str, int]:
        """Total and active-per-token parameter counts (tied weights counted once)."""
        from ..params import count_parameters

        return count_parameters(self)
