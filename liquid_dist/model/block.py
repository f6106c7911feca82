"""ImprovedTransformerBlock (seed 3.8): one unit of the encoder and decoder stacks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMaskPlan, CrossAttention, EnhancedLocalAttentionWithGQA
from .config import ModelConfig, MoEConfig
from .conv import OptimizedGatedConvolution
from .init import initialised
from .moe import MoELayer
from .utils import replace_nonfinite, residual_scale, xavier_linear

AuxDict = dict[str, torch.Tensor]


class FeedForward(nn.Module):
    """The block's closing MLP: Linear → LayerNorm → GELU → Dropout → Linear → Dropout.

    The output is clamped to ±100 (seed §4) before the residual add. ``output_scale``
    scales fc2's init (:func:`~liquid_dist.model.utils.residual_scale`).
    """

    @initialised
    def __init__(self, cfg: ModelConfig, output_scale: float = 1.0):
        super().__init__()
        self.fc1 = xavier_linear(cfg.d_model, cfg.ffn_dim)
        self.norm = nn.LayerNorm(cfg.ffn_dim)
        self.fc2 = xavier_linear(cfg.ffn_dim, cfg.d_model, scale=output_scale)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(F.gelu(self.norm(self.fc1(x))))
        return self.dropout(self.fc2(h)).clamp(-100.0, 100.0)


class DenseFFN(nn.Module):
    """The plain counterpart of the MoE sub-block (``model.ablate: [moe]``), at the MoE's
    active width.

    ``expert_type: mlp``: Linear(d -> top_k * expert_ffn_dim) -> GELU -> Linear(-> d) ->
    Dropout, i.e. the ``top_k`` experts a token nominally uses, fused into one MLP (the
    same matmul FLOPs per token as the MoE's nominal k, which the FLOP counter uses).
    ``expert_type: linear``: one Linear(d -> d), the dense form of a sum of linear
    experts. Position-wise, so padding reaches no other position; no router, no
    auxiliary losses. ``output_scale`` scales the last Linear's init, as the MoE's.
    """

    @initialised
    def __init__(self, moe_cfg: MoEConfig, d_model: int, dropout: float = 0.0,
                 output_scale: float = 1.0):
        super().__init__()
        if moe_cfg.expert_type == "mlp":
            width = moe_cfg.top_k * moe_cfg.expert_ffn_dim
            self.fc1 = xavier_linear(d_model, width)
            self.fc2 = xavier_linear(width, d_model, scale=output_scale)
        else:
            self.fc1 = xavier_linear(d_model, d_model, scale=output_scale)
            self.fc2 = None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.fc2 is not None:
            h = self.fc2(F.gelu(h))
        return self.dropout(h)


class ImprovedTransformerBlock(nn.Module):
    """Pre-LN residual sub-blocks in the seed's order.

    The output projection of every sub-block (attention, cross-attention, MoE
    experts or their dense counterpart, FFN) starts at its Xavier scale times
    ``1 / sqrt(2 · layers of the stack)`` (GPT-2, safari); the convolution
    sub-block starts at exactly 0 (its LayerNorm gain is 0).

    local GQA attention → (decoder: cross-attention to the encoder) → gated
    deformable convolution → MoE → feed-forward. ``forward`` returns the new
    activations (B, L, d) and this block's auxiliary dict: the MoE's terms (none
    when ``model.ablate`` removes the MoE) and ``nonfinite``.

    ``model.ablate``: ``deformable_conv`` drops the convolution sub-block (identity);
    ``moe`` replaces the MoE by a :class:`DenseFFN` sub-block (``dense_ffn_norm``,
    ``dense_ffn``) of the same active width.

    Non-finite values: the block's input and the residual stream after every
    sub-block's add have each NaN/±Inf replaced by 0
    (:func:`~liquid_dist.model.utils.replace_nonfinite`), so every tensor that
    enters a LayerNorm, and hence every sequence-mixing layer, is finite and a
    bad value stays at its own position. ``nonfinite`` (int64 scalar, no host
    sync, not a loss term) counts the values replaced in one forward. In
    strict mode (``model.check_finite``) the first one raises
    ``NonFiniteError`` naming ``<block name>.<input|attn|cross_attn|conv|moe|dense_ffn|ffn>``.
    """

    @initialised
    def __init__(self, cfg: ModelConfig, causal: bool, name: str = "block"):
        super().__init__()
        self.causal = causal
        self.name = name
        self.strict = cfg.check_finite
        d = cfg.d_model
        # every sub-block's output projection, scaled for the depth of its stack
        scale = residual_scale(cfg.n_decoder_layers if causal else cfg.n_encoder_layers)
        self.attn_norm = nn.LayerNorm(d)
        self.attn = EnhancedLocalAttentionWithGQA(cfg, causal=causal, output_scale=scale)
        if causal:
            self.cross_norm = nn.LayerNorm(d)
            self.cross_attn = CrossAttention(cfg, output_scale=scale)
        self.has_conv = cfg.keeps("deformable_conv")
        if self.has_conv:
            self.conv_norm = nn.LayerNorm(d)
            self.conv = OptimizedGatedConvolution(cfg, causal=causal)
        self.has_moe = cfg.keeps("moe")
        if self.has_moe:
            self.moe_norm = nn.LayerNorm(d)
            self.moe = MoELayer(cfg.moe, d, dropout=cfg.dropout, check_finite=cfg.check_finite,
                                output_scale=scale)
        else:
            self.dense_ffn_norm = nn.LayerNorm(d)
            self.dense_ffn = DenseFFN(cfg.moe, d, dropout=cfg.dropout, output_scale=scale)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn = FeedForward(cfg, output_scale=scale)

    def _finite(self, part: str, x: torch.Tensor, counts: list[torch.Tensor]) -> torch.Tensor:
        """``x`` with non-finite values set to 0; appends how many to ``counts``."""
        x, count = replace_nonfinite(f"{self.name}.{part}", x, self.strict)
        counts.append(count)
        return x

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        plan: AttentionMaskPlan | None = None,
    ) -> tuple[torch.Tensor, AuxDict]:
        """x (B, L, d); mask (B, L) bool, True = real token, or None (all real).

        Decoder blocks also take ``memory`` (B, Le, d) and its ``memory_mask``
        (B, Le). Self-attention, convolution and MoE all take ``mask``: what a
        padding position holds reaches no other position, and padding is not
        routed to any expert. ``plan``: the self-attention's
        :class:`~liquid_dist.model.attention.AttentionMaskPlan` of ``mask``,
        shared by the stack's blocks (None: one per call).
        """
        counts: list[torch.Tensor] = []
        x = self._finite("input", x, counts)
        x = self._finite("attn", x + self.attn(self.attn_norm(x), mask, plan), counts)
        if self.causal:
            if memory is None:
                raise ValueError(f"{self.name}: a decoder block needs the encoder output")
            cross = self.cross_attn(self.cross_norm(x), memory, memory_mask)
            x = self._finite("cross_attn", x + cross, counts)
        if self.has_conv:
            x = self._finite("conv", x + self.conv(self.conv_norm(x), mask), counts)
        aux: AuxDict = {}
        if self.has_moe:
            moe_out, aux = self.moe(self.moe_norm(x), mask)
            x = self._finite("moe", x + moe_out, counts)
        else:
            x = self._finite("dense_ffn", x + self.dense_ffn(self.dense_ffn_norm(x)), counts)
        x = self._finite("ffn", x + self.ffn(self.ffn_norm(x)), counts)
        return x, {**aux, "nonfinite": torch.stack(counts).sum()}

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
        """Incremental-decoding state (decoder blocks only); tensors are batch-first."""
        state = {"attn": self.attn.init_state(batch_size, device, dtype)}
        if self.has_conv:
            state["conv"] = self.conv.init_state(batch_size, device, dtype)
        return state

    def step(
        self,
        x_t: torch.Tensor,
        state: dict,
        pos: int,
        cross_kv: tuple[torch.Tensor, torch.Tensor],
        memory_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict]:
        """One decoder position: x_t (B, 1, d) at absolute position ``pos``.

        Equals ``forward`` at ``pos``, non-finite values replaced alike (not counted).
        """
        counts: list[torch.Tensor] = []
        x_t = self._finite("input", x_t, counts)
        a, attn_state = self.attn.step(self.attn_norm(x_t), state["attn"], pos)
        x_t = self._finite("attn", x_t + a, counts)
        cross = self.cross_attn.attend(self.cross_norm(x_t), *cross_kv, memory_mask)
        x_t = self._finite("cross_attn", x_t + cross, counts)
        new_state = {"attn": attn_state}
        if self.has_conv:
            c, new_state["conv"] = self.conv.step(self.conv_norm(x_t), state["conv"], pos)
            x_t = self._finite("conv", x_t + c, counts)
        if self.has_moe:
            moe_out, _ = self.moe(self.moe_norm(x_t))
            x_t = self._finite("moe", x_t + moe_out, counts)
        else:
            x_t = self._finite("dense_ffn", x_t + self.dense_ffn(self.dense_ffn_norm(x_t)),
                               counts)
        x_t = self._finite("ffn", x_t + self.ffn(self.ffn_norm(x_t)), counts)
        return x_t, new_state
