"""Deformable and gated convolutions (seed 3.5-3.6; docs/model.md, "DeformableConv1d").

``DeformableConv1d`` samples its input at learned, bounded, fractional
positions (linear interpolation between the two integer neighbours) and then
applies an ordinary convolution weight to the samples.
``OptimizedGatedConvolution`` wraps it in GELU(main) * sigmoid(gate) ->
LayerNorm -> Dropout.

Both come in an encoder (non-causal, centred taps) and a decoder (causal)
form; the causal form also decodes incrementally with ``init_state`` /
``step``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .init import (
    Constant,
    KaimingNormal,
    buffer_device,
    initialised,
    new_parameter,
    set_init,
)
from .utils import check_finite, zero_padding


class DeformableConv1d(nn.Module):
    """1-D convolution whose K taps sit at learned fractional offsets.

    For output position l and tap m (0 <= m < K) the sampling position is

    * non-causal: ``p = l + (m - (K-1)//2) + Δ[l, m]`` (taps centred on l);
    * causal:     ``p = min(l - (K-1) + m + Δ[l, m], l)`` (never after l),

    with ``Δ = max_offset * tanh(offset_conv(x))`` so every tap stays within
    ``max_offset`` positions of its base and the receptive field is known.
    x is read at p by linear interpolation between floor(p) and floor(p)+1;
    positions outside [0, L-1] read zero (zero padding, never edge clamping),
    so outputs at real positions do not depend on how much padding follows.
    ``offset_conv`` (kernel K, same padding / causal left padding) starts at
    zero, so a fresh module is exactly an ordinary zero-padded convolution.

    Only stride 1 is supported (the only stride the model uses).
    """

    @initialised
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        max_offset: float,
        causal: bool,
        stride: int = 1,
    ):
        super().__init__()
        if stride != 1:
            raise ValueError(f"DeformableConv1d supports stride 1 only, got stride={stride}")
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        if max_offset < 0:
            raise ValueError(f"max_offset must be >= 0, got {max_offset}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.max_offset = float(max_offset)
        self.causal = causal
        k = kernel_size
        # Left / right zero padding of the offset conv
        self._pad = (k - 1, 0) if causal else ((k - 1) // 2, k - 1 - (k - 1) // 2)
        for name, value in self.derived_buffers().items():
            self.register_buffer(name, value, persistent=False)
        self.offset_conv = nn.Conv1d(in_channels, k, k)
        set_init(self.offset_conv, "weight", Constant(0.0))
        set_init(self.offset_conv, "bias", Constant(0.0))
        # Kaiming-normal (fan-in = in_channels * K), as utils.kaiming_conv1d.
        new_parameter(self, "weight", torch.empty(out_channels, in_channels, k), KaimingNormal())
        new_parameter(self, "bias", torch.empty(out_channels), Constant(0.0))

    def derived_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers derived from the config, so kept out of the state dict: ``_base``,
        the position of each tap relative to the output position."""
        k = self.kernel_size
        first = -(k - 1) if self.causal else -((k - 1) // 2)
        return {"_base": torch.arange(k, dtype=torch.float32, device=buffer_device()) + first}

    @property
    def history(self) -> int:
        """Past inputs the causal form reads: K - 1 + ceil(max_offset)."""
        return self.kernel_size - 1 + math.ceil(self.max_offset)

    def offsets(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Bounded offsets Δ (B, L, K) for input x (B, L, C_in); |Δ| <= max_offset."""
        x = zero_padding(x, mask)
        raw = self.offset_conv(F.pad(x.transpose(1, 2), self._pad))
        return self.max_offset * torch.tanh(raw.transpose(1, 2))

    def _sample_weights(
        self, delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer left neighbour and interpolation weights per tap.

        Returns (left, w_left, w_right), all (..., K): ``left`` (long) is the
        floor of the sampling position relative to the output position, and
        the weights belong to x[l + left] and x[l + left + 1]. Working relative
        to l keeps the fractional part exact at any absolute position, and in
        float32 even under bf16 autocast, so ``step`` reproduces ``forward``.
        """
        rel = self._base.float() + delta.float()
        if self.causal:
            rel = rel.clamp(max=0.0)
        left = torch.floor(rel)
        alpha = rel - left
        return left.long(), 1.0 - alpha, alpha

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, C_in), mask (B, L) bool or None -> (B, L, C_out).

        Padded positions of x are zeroed first, so their content never reaches
        a real position. Causal form: output l depends on x[<= l] only.
        """
        x = zero_padding(x, mask)
        bsz, length, _ = x.shape
        delta = self.offsets(x)
        left, w_left, w_right = self._sample_weights(delta)
        pos = torch.arange(length, device=x.device).view(1, length, 1)
        idx_left = pos + left  # (B, L, K) absolute positions
        # Highest position a tap may touch: the output position itself in the
        # causal form (even with zero weight, so nothing from the future --
        # not even a NaN -- is ever gathered), else the last position.
        hi = pos if self.causal else torch.full_like(pos, length - 1)
        x_flat = x.reshape(bsz * length, -1)
        batch_start = (torch.arange(bsz, device=x.device) * length).view(bsz, 1, 1)
        samples = 0.0
        for idx, w in ((idx_left, w_left), (idx_left + 1, w_right)):
            valid = (idx >= 0) & (idx <= hi)
            safe = torch.minimum(idx.clamp(min=0), hi)
            gathered = x_flat[(safe + batch_start).reshape(-1)].view(bsz, length, -1, x.shape[-1])
            w = torch.where(valid, w, torch.zeros_like(w)).to(x.dtype)
            samples = samples + w.unsqueeze(-1) * gathered
        return torch.einsum("blkc,ock->blo", samples, self.weight) + self.bias

    # ---------------------------------------------------- incremental decoding

    def init_state(
        self, batch_size: int, device: torch.device | str | None, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """Empty causal state: {'x': (B, K-1+ceil(max_offset), C_in)} of zeros.

        The buffer holds the most recent past inputs, oldest first; positions
        before 0 read zero, which is what the zero buffer encodes.
        """
        if not self.causal:
            raise RuntimeError("init_state/step exist only for the causal DeformableConv1d")
        return {"x": torch.zeros(batch_size, self.history, self.in_channels,
                                 device=device, dtype=dtype)}

    def step(
        self, x_t: torch.Tensor, state: dict[str, torch.Tensor], pos: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One causal step: x_t (B, 1, C_in) at absolute position ``pos``.

        Returns (y_t (B, 1, C_out), new state); equals ``forward`` at ``pos``
        when fed positions 0..pos in order from ``init_state``. The sampling
        is relative to the current position, so ``pos`` itself is not needed.
        """
        if not self.causal:
            raise RuntimeError("init_state/step exist only for the causal DeformableConv1d")
        k = self.kernel_size
        window = torch.cat([state["x"], x_t], dim=1)  # (B, W, C); last row = pos
        width = window.shape[1]
        raw = torch.einsum("bkc,ock->bo", window[:, width - k:], self.offset_conv.weight)
        delta = self.max_offset * torch.tanh(raw + self.offset_conv.bias)  # (B, K)
        left, w_left, w_right = self._sample_weights(delta)
        samples = 0.0
        for rel_idx, w in ((left, w_left), (left + 1, w_right)):
            # rel_idx lies in [-history, 0] except the right neighbour of a tap
            # clamped onto ``pos`` (rel_idx 1, weight exactly 0): clamping its
            # slot reads x_t instead of the future. Positions before 0 read
            # the zeros the state starts with.
            slot = (rel_idx + width - 1).clamp(0, width - 1)
            gathered = torch.gather(
                window, 1, slot.unsqueeze(-1).expand(-1, -1, window.shape[-1])
            )
            samples = samples + w.to(window.dtype).unsqueeze(-1) * gathered
        y = torch.einsum("bkc,ock->bo", samples, self.weight) + self.bias
        return y.unsqueeze(1), {"x": window[:, 1:]}


class OptimizedGatedConvolution(nn.Module):
    """DeformableConv1d(d -> 2d) -> [main, gate] -> GELU(main) * sigmoid(gate)
    -> LayerNorm -> Dropout (seed 3.6).

    The LayerNorm's gain starts at 0: the module is a residual branch, and a
    LayerNorm with gain 1 would add a unit-RMS vector to the residual stream
    whatever its input; so the branch starts at exactly 0 and learns its gain.

    forward(x (B, L, d), mask) -> (B, L, d). The causal form (decoder) also has
    ``init_state`` / ``step`` with the state of its deformable convolution.
    """

    @initialised
    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        d = cfg.d_model
        self.causal = causal
        self.check = cfg.check_finite
        self.conv = DeformableConv1d(d, 2 * d, cfg.conv_kernel_size, cfg.max_offset, causal)
        self.norm = nn.LayerNorm(d)
        set_init(self.norm, "weight", Constant(0.0))
        self.dropout = nn.Dropout(cfg.dropout)

    def _gate(self, y: torch.Tensor) -> torch.Tensor:
        main, gate = y.chunk(2, dim=-1)
        out = self.dropout(self.norm(F.gelu(main) * torch.sigmoid(gate)))
        return check_finite("OptimizedGatedConvolution", out, self.check)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, d), mask (B, L) bool or None -> (B, L, d)."""
        return self._gate(self.conv(x, mask))

    def init_state(
        self, batch_size: int, device: torch.device | str | None, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """Causal state: {'x': (B, K-1+ceil(max_offset), d)} of past inputs."""
        return self.conv.init_state(batch_size, device, dtype)

    def step(
        self, x_t: torch.Tensor, state: dict[str, torch.Tensor], pos: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x_t (B, 1, d) at position ``pos`` -> (y_t (B, 1, d), new state)."""
        y, state = self.conv.step(x_t, state, pos)
        return self._gate(y), state
