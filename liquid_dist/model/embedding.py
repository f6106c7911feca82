"""EnhancedLiquidEmbedding (seed 3.2; docs/model.md, "EnhancedLiquidEmbedding")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, next_power_of_two
from .frequency import FrequencyHyenaAttention, fp32_region
from .init import Normal, initialised, set_init
from .utils import (
    check_finite,
    kaiming_conv1d,
    xavier_linear,
    zero_gain,
    zero_padding,
)

# Share of the rfft bins (the highest ones) whose energy measures spectral complexity.
_HIGH_BAND_FRACTION = 0.2
_EPS = 1e-8


class EnhancedLiquidEmbedding(nn.Module):
    """Token ids -> (X_proj (B, L, d), L_recon scalar).

    Pipeline (seed 3.2, in the seed's order), each stage a residual branch
    whose per-channel gain ``g_*`` starts at 0 (docs/model.md, "Initialisation")::

        X   = E_token(ids) + E_pos(0..L-1)
        X_3 = X + g_conv ⊙ LayerNorm(GELU(Conv2(GELU(Conv1(X)))))
        Y   = X_3 + g_freq ⊙ FrequencyHyenaAttention(X_3)    (causal form in the decoder)
        R   = LayerNorm(Linear(irfft(keep-lowest-bins mask ⊙ rfft(Y))))   (decoder: of Y)
        X_proj = Y + g_proj ⊙ R
        L_recon = Σ_real |R - sg(X_3)| / (#real · d + eps)

    At initialisation every gain is 0, so X_proj = X (padding zeroed): the
    embedding starts as its plain counterpart and learns how much of each
    stage to add. R, the compressed signal reconstructed and projected back
    (the seed's X_proj), is what L_recon trains to reproduce X_3.

    ``token_embedding`` is owned by the model (shared by encoder and decoder,
    possibly tied to the output head); the learned position embedding has
    ``max_encoder_length`` / ``max_decoder_length`` rows. Both convolutions
    see padded positions (``mask`` False) as zeros, so no output position
    depends on what padding holds; encoder convolutions use "same" zero
    padding, decoder convolutions are causal (left padding) and no spectral
    truncation is applied there (it is non-causal).

    Adaptive compression (encoder), per sequence, with fixed shapes: the
    zero-padded Y is rfft-ed at ``n_fft = next_power_of_two(max_encoder_length)``
    and only the lowest ``ceil(ratio · n_bins)`` bins are kept, where
    ``ratio = clamp(min + (base - min) · complexity, min, base)`` (see
    :meth:`kept_bins`). The spectrum measured is the one that is truncated
    (Y's). The mask is hard, so ratio gets no gradient: it is computed without
    autograd, and the gradient reaches Y through the kept bins.

    L_recon compares R with X_3 over real tokens (all positions when ``mask``
    is None). X_3 is the target and is detached (``sg``): otherwise the loss
    could also be lowered by moving the target instead of by reconstructing it.

    ``model.ablate`` (docs/model.md, "Ablations"): ``embedding_conv`` removes the
    convolutional stem (X_3 = X, its padding zeroed as the stem's first convolution
    would); ``frequency`` the frequency module (Y = X_3); ``compression`` the
    compression, the reconstruction projection and L_recon (X_proj = Y, L_recon
    is 0). All three: the output is ``E_token(ids) + E_pos``.
    """

    @initialised
    def __init__(self, cfg: ModelConfig, token_embedding: nn.Embedding, causal: bool):
        super().__init__()
        d = cfg.d_model
        if token_embedding.embedding_dim != d:
            raise ValueError(f"token embedding width {token_embedding.embedding_dim} != "
                             f"model.d_model ({d})")
        self.causal = causal
        self.d_model = d
        self.check = cfg.check_finite
        self.max_length = cfg.max_decoder_length if causal else cfg.max_encoder_length
        self.kernel_size = cfg.embed_kernel_size
        self.token_embedding = token_embedding
        self.position_embedding = nn.Embedding(self.max_length, d)
        set_init(self.position_embedding, "weight", Normal(0.02))
        self.has_conv = cfg.keeps("embedding_conv")
        if self.has_conv:
            padding = 0 if causal else self.kernel_size // 2
            self.conv1 = kaiming_conv1d(d, d, self.kernel_size, padding=padding)
            self.conv2 = kaiming_conv1d(d, d, self.kernel_size, padding=padding)
            self.norm = nn.LayerNorm(d)
            zero_gain(self, "conv_gain", d)
        self.has_frequency = cfg.keeps("frequency")
        if self.has_frequency:
            self.frequency = FrequencyHyenaAttention(cfg, causal=causal)
            zero_gain(self, "frequency_gain", d)
        self.has_compression = cfg.keeps("compression")
        if self.has_compression:
            self.proj = xavier_linear(d, d)
            self.proj_norm = nn.LayerNorm(d)
            zero_gain(self, "proj_gain", d)
        self.n_fft = next_power_of_two(cfg.max_encoder_length)
        self.min_ratio = cfg.min_compression_ratio
        self.base_ratio = cfg.base_compression_ratio

    def _conv(self, conv: nn.Conv1d, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = zero_padding(x, mask).transpose(1, 2)
        if self.causal:
            x = F.pad(x, (self.kernel_size - 1, 0))
        return conv(x).transpose(1, 2)

    def forward(self, input_ids: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, L) long, mask (B, L) bool (True = real) or None.

        Returns X_proj (B, L, d) and L_recon (float32 scalar, >= 0, depends
        only on real positions; 0 when ``compression`` is ablated).
        """
        length = input_ids.shape[1]
        if length > self.max_length:
            kind = "decoder" if self.causal else "encoder"
            raise ValueError(f"{kind} sequence length {length} > max_{kind}_length "
                             f"({self.max_length})")
        positions = torch.arange(length, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        x3 = zero_padding(x, mask)
        if self.has_conv:
            h = F.gelu(self._conv(self.conv1, x, mask))
            h = F.gelu(self._conv(self.conv2, h, mask))
            x3 = x3 + self.conv_gain * self.norm(h)
        y = x3
        if self.has_frequency:
            y = y + self.frequency_gain * self.frequency(x3, mask)
        if not self.has_compression:
            y = check_finite("EnhancedLiquidEmbedding", y, self.check)
            return y, y.new_zeros((), dtype=torch.float32)
        r = self._compress(y, mask) if not self.causal else y
        r = self.proj_norm(self.proj(r.to(self.proj.weight.dtype)))
        x_proj = check_finite("EnhancedLiquidEmbedding", y + self.proj_gain * r, self.check)
        return x_proj, self._recon_loss(r, x3, mask)

    def _recon_loss(self, r: torch.Tensor, x3: torch.Tensor,
                    mask: torch.Tensor | None) -> torch.Tensor:
        err = (r.float() - x3.detach().float()).abs().sum(dim=-1)
        if mask is None:
            return err.sum() / (err.numel() * self.d_model + _EPS)
        real = mask.to(err.dtype)
        return (err * real).sum() / (real.sum() * self.d_model + _EPS)

    def _compress(self, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Keep the lowest kept_bins(y) rfft bins of each sequence: (B, L, d) -> float32."""
        length = y.shape[1]
        with fp32_region(y.device):
            y = zero_padding(y.float(), mask)
            spec = torch.fft.rfft(y, n=self.n_fft, dim=1, norm="ortho")
            keep = self._kept_bins(spec, y, mask)
            bins = torch.arange(spec.shape[1], device=y.device)
            spec = spec * (bins[None, :] < keep[:, None]).unsqueeze(-1)
            return torch.fft.irfft(spec, n=self.n_fft, dim=1, norm="ortho")[:, :length]

    def kept_bins(self, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """How many of the lowest rfft bins the compression keeps for y (B, L, d): (B,) long."""
        with fp32_region(y.device):
            y = zero_padding(y.float(), mask)
            spec = torch.fft.rfft(y, n=self.n_fft, dim=1, norm="ortho")
            return self._kept_bins(spec, y, mask)

    @torch.no_grad()
    def _kept_bins(self, spec: torch.Tensor, y: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
        """Per-sequence kept-bin count from the spectrum and the zero-padded signal.

        complexity = 0.7 · freq_energy_norm + 0.3 · local_var_norm, both in [0, 1]:

        * freq_energy_norm: energy of the top 20 % rfft bins / total energy;
        * local_var_norm: Σ over adjacent pairs of real positions of
          ||y[l] - y[l-1]||² / (4 · Σ over real positions of ||y[l]||²).
          Since ||a - b||² <= 2(||a||² + ||b||²) and each position is in at
          most two pairs, this is in [0, 1]: 0 for a constant sequence, about
          1/2 for white noise, 1 for a sign-alternating one.

        Returns ``clamp(ceil(ratio · n_bins), 1, n_bins)``.
        """
        n_bins = spec.shape[1]
        power = (spec.real.square() + spec.imag.square()).sum(dim=-1)
        high = int(math.floor((1 - _HIGH_BAND_FRACTION) * n_bins))
        freq_energy = power[:, high:].sum(dim=1) / (power.sum(dim=1) + _EPS)
        diff = (y[:, 1:] - y[:, :-1]).square().sum(dim=-1)
        if mask is not None:
            diff = diff * (mask[:, 1:] & mask[:, :-1]).to(diff.dtype)
        local_var = diff.sum(dim=1) / (4 * y.square().sum(dim=(1, 2)) + _EPS)
        complexity = 0.7 * freq_energy + 0.3 * local_var.clamp(0.0, 1.0)
        ratio = (self.min_ratio + (self.base_ratio - self.min_ratio) * complexity).clamp(
            self.min_ratio, self.base_ratio)
        return torch.ceil(ratio * n_bins).long().clamp(1, n_bins)

    def init_state(self, batch_size: int, device: torch.device,
                   dtype: torch.dtype) -> dict:
        """Decoder decoding state: the last kernel-1 inputs of each convolution
        (``conv1``, ``conv2``: (B, kernel-1, d), zeros = the causal left padding)
        and the frequency module's state (``frequency``, a dict); only the parts
        that ``model.ablate`` keeps."""
        if not self.causal:
            raise RuntimeError("the encoder EnhancedLiquidEmbedding is not incremental")
        state = {}
        if self.has_conv:
            shape = (batch_size, self.kernel_size - 1, self.d_model)
            state["conv1"] = torch.zeros(shape, device=device, dtype=dtype)
            state["conv2"] = torch.zeros(shape, device=device, dtype=dtype)
        if self.has_frequency:
            state["frequency"] = self.frequency.init_state(batch_size, device, dtype)
        return state

    @staticmethod
    def _conv_window(conv: nn.Conv1d, window: torch.Tensor) -> torch.Tensor:
        """The causal conv's output for the last position of window (B, kernel, d): (B, 1, d)."""
        return conv(window.to(conv.weight.dtype).transpose(1, 2)).transpose(1, 2)

    def step(self, input_ids_t: torch.Tensor, state: dict,
             pos: int) -> tuple[torch.Tensor, dict]:
        """input_ids_t (B, 1) long at position ``pos`` -> (x_t (B, 1, d), new state).

        x_t equals ``forward(ids)[0][:, pos]`` given the same earlier tokens.
        """
        if not self.causal:
            raise RuntimeError("the encoder EnhancedLiquidEmbedding is not incremental")
        if not 0 <= pos < self.max_length:
            raise ValueError(f"decoder position {pos} outside [0, max_decoder_length="
                             f"{self.max_length})")
        position = torch.full_like(input_ids_t, pos)
        x = self.token_embedding(input_ids_t) + self.position_embedding(position)
        new_state = {}
        if self.has_conv:
            window1 = torch.cat([state["conv1"], x.to(state["conv1"].dtype)], dim=1)
            h = F.gelu(self._conv_window(self.conv1, window1))
            window2 = torch.cat([state["conv2"], h.to(state["conv2"].dtype)], dim=1)
            x = x + self.conv_gain * self.norm(F.gelu(self._conv_window(self.conv2, window2)))
            new_state.update(conv1=window1[:, 1:], conv2=window2[:, 1:])
        if self.has_frequency:
            f, new_state["frequency"] = self.frequency.step(x, state["frequency"], pos)
            x = x + self.frequency_gain * f
        if self.has_compression:
            x = x + self.proj_gain * self.proj_norm(self.proj(x.to(self.proj.weight.dtype)))
        return check_finite("EnhancedLiquidEmbedding", x, self.check), new_state
