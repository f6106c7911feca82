"""ImprovedTransformerBlock (seed 3.8): one unit of the encoder and decoder stacks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import CrossAttention, EnhancedLocalAttentionWithGQA
from .conv import OptimizedGatedConvolution
from .moe import MoELayer
from .utils import check_finite, xavier_linear

AuxDict = dict[str, torch.Tensor]


class FeedForward(nn.Module):
    """The block's closing MLP: Linear → LayerNorm → GELU → Dropout → Linear → Dropout.

    The output is clamped to ±100 (seed §4) before the residual add.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = xavier_linear(cfg.d_model, cfg.ffn_dim)
        self.norm = nn.LayerNorm(cfg.ffn_dim)
        self.fc2 = xavier_linear(cfg.ffn_dim, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(F.gelu(self.norm(self.fc1(x))))
        return self.dropout(self.fc2(h)).clamp(-100.0, 100.0)


class ImprovedTransformerBlock(nn.Module):
    """Pre-LN residual sub-blocks in the seed's order.

    local GQA attention → (decoder: cross-attention to the encoder) → gated
    deformable convolution → MoE → feed-forward. ``forward`` returns the new
    activations (B, L, d) and this block's MoE auxiliary dict.
    """

    def __init__(self, cfg: ModelConfig, causal: bool, name: str = "block"):
        super().__init__()
        self.causal = causal
        self.name = name
        self.strict = cfg.check_finite
        d = cfg.d_model
        self.attn_norm = nn.LayerNorm(d)
        self.attn = EnhancedLocalAttentionWithGQA(cfg, causal=causal)
        if causal:
            self.cross_norm = nn.LayerNorm(d)
            self.cross_attn = CrossAttention(cfg)
        self.conv_norm = nn.LayerNorm(d)
        self.conv = OptimizedGatedConvolution(cfg, causal=causal)
        self.moe_norm = nn.LayerNorm(d)
        self.moe = MoELayer(cfg.moe, d, dropout=cfg.dropout, check_finite=cfg.check_finite)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn = FeedForward(cfg)

    def _check(self, part: str, x: torch.Tensor) -> torch.Tensor:
        return check_finite(f"{self.name}.{part}", x, self.strict)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, AuxDict]:
        """x (B, L, d); mask (B, L) bool, True = real token, or None (all real).

        Decoder blocks also take ``memory`` (B, Le, d) and its ``memory_mask``
        (B, Le). Self-attention, convolution and MoE all take ``mask``: what a
        padding position holds reaches no other position, and padding is not
        routed to any expert.
        """
        x = x + self._check("attn", self.attn(self.attn_norm(x), mask))
        if self.causal:
            if memory is None:
                raise ValueError(f"{self.name}: a decoder block needs the encoder output")
            cross = self.cross_attn(self.cross_norm(x), memory, memory_mask)
            x = x + self._check("cross_attn", cross)
        x = x + self._check("conv", self.conv(self.conv_norm(x), mask))
        moe_out, aux = self.moe(self.moe_norm(x), mask)
        x = x + self._check("moe", moe_out)
        x = torch.nan_to_num(x + self._check("ffn", self.ffn(self.ffn_norm(x))))
        return x, aux

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
        """Incremental-decoding state (decoder blocks only); tensors are batch-first."""
        return {
            "attn": self.attn.init_state(batch_size, device, dtype),
            "conv": self.conv.init_state(batch_size, device, dtype),
        }

    def step(
        self,
        x_t: torch.Tensor,
        state: dict,
        pos: int,
        cross_kv: tuple[torch.Tensor, torch.Tensor],
        memory_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict]:
        """One decoder position: x_t (B, 1, d) at absolute position ``pos``."""
        a, attn_state = self.attn.step(self.attn_norm(x_t), state["attn"], pos)
        x_t = x_t + a
        x_t = x_t + self.cross_attn.attend(self.cross_norm(x_t), *cross_kv, memory_mask)
        c, conv_state = self.conv.step(self.conv_norm(x_t), state["conv"], pos)
        x_t = x_t + c
        moe_out, _ = self.moe(self.moe_norm(x_t))
        x_t = x_t + moe_out
        x_t = torch.nan_to_num(x_t + self.ffn(self.ffn_norm(x_t)))
        return x_t, {"attn": attn_state, "conv": conv_state}
