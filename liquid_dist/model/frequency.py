"""FrequencyHyenaAttention (seed 3.1; docs/model.md, "FrequencyHyenaAttention").

Two forms share the seed's class name:

* encoder (``causal=False``): the spectral operator as written in the seed —
  rfft of the sequence, per-octave-band ``Linear_b`` + ``LayerNorm_b`` on the
  magnitude, multi-head attention over the bins inside each band (large bands
  split into blocks of at most ``band_block`` bins), modulation with the phase,
  scatter back, irfft, ``Linear`` + ``LayerNorm``;
* decoder (``causal=True``): a full-spectrum operation mixes every position,
  so the decoder uses the Hyena operator proper, :class:`HyenaLongConvolution`
  (a gated causal FFT long convolution with an implicit filter), which
  ``FrequencyHyenaAttention`` delegates to.

All Fourier transforms run in float32 with autocast off (``torch.fft.rfft``
rejects bf16 on CPU, and bf16 spectra lose too much precision), and so does
the decoder's implicit filter (its MLP upcasts its weights, whatever the
parameters' dtype); the projections and the attention run in the parameters'
dtype under the ambient autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, next_power_of_two
from .init import Constant, buffer_device, initialised, new_parameter
from .utils import check_finite, no_weight_decay, xavier_linear, zero_padding


def fp32_region(device: torch.device) -> torch.autocast:
    """A context in which autocast is off, so spectral maths stays in float32."""
    return torch.autocast(device_type=device.type, enabled=False)


def octave_bands(n_fft: int) -> list[tuple[int, int]]:
    """The octave bands ``[start, end)`` of the ``n_fft // 2 + 1`` rfft bins.

    Band 0 is the DC bin alone, band b >= 1 is ``[2**(b-1), 2**b)``; the
    Nyquist bin ``n_fft // 2`` joins the last band. The bands are disjoint,
    ordered, and cover every bin exactly once.
    """
    n_bins = n_fft // 2 + 1
    bands = [(0, 1)]
    lo = 1
    while 2 * lo <= n_fft // 2:
        bands.append((lo, 2 * lo))
        lo *= 2
    bands[-1] = (bands[-1][0], n_bins)
    return bands


def band_block_groups(bands: list[tuple[int, int]], band_block: int) -> list[torch.Tensor]:
    """Bin indices of the attention blocks, grouped by block size.

    Every band is cut into consecutive blocks of at most ``band_block`` bins
    (a block never crosses a band edge). Blocks of equal size form one group,
    returned as a long tensor (num_blocks, size), sorted by size, so one
    attention call serves a whole group. Block sizes are the band sizes below
    ``band_block``, ``band_block`` itself and the remainders, hence at most
    O(log n_fft) groups. Built on :func:`~liquid_dist.model.init.buffer_device`.
    """
    starts_by_size: dict[int, list[int]] = {}
    for lo, hi in bands:
        for start in range(lo, hi, band_block):
            size = min(band_block, hi - start)
            starts_by_size.setdefault(size, []).append(start)
    groups = []
    for size in sorted(starts_by_size):
        starts = torch.tensor(starts_by_size[size], dtype=torch.long, device=buffer_device())
        groups.append(starts[:, None]
                      + torch.arange(size, dtype=torch.long, device=starts.device)[None, :])
    return groups


class FrequencyHyenaAttention(nn.Module):
    """Spectral sequence mixer of the embedding (seed 3.1).

    ``FrequencyHyenaAttention(cfg)`` is the encoder form;
    ``FrequencyHyenaAttention(cfg, causal=True)`` is the decoder form and
    delegates everything (forward, ``init_state``, ``step``) to its
    :class:`HyenaLongConvolution` ``self.hyena``.

    Encoder form, for x (B, L, d) with L <= ``cfg.max_encoder_length``:

    1. padded positions are zeroed, the sequence is zero-padded to
       ``n_fft = next_power_of_two(cfg.max_encoder_length)`` (fixed by the
       config, so outputs at real positions never depend on how much padding
       the batch carries) and ``rfft``-ed (``norm="ortho"``: unit-scale
       spectra whatever ``n_fft`` is, so the LayerNorms never work at a scale
       comparable to their epsilon);
    2. magnitude M and unit phase factor e^{iΦ} (= X/|X|, and 1 where X = 0,
       which keeps gradients finite at zero bins);
    3. each octave band b (:func:`octave_bands`) gets its own
       ``LayerNorm_b(Linear_b(M_b))``;
    4. multi-head attention (``cfg.freq_heads`` heads) among the bins of a
       band, in blocks of at most ``cfg.band_block`` bins, one
       ``scaled_dot_product_attention`` call per block-size group. The q/k/v
       projection is one ``Linear(d, 3d)`` shared by all bands: the per-band
       ``Linear_b`` already specialises each band, and sharing keeps the
       projection a single matmul over all bins. There is no separate
       attention output projection: the final ``Linear`` after the irfft
       mixes channels (it cannot go before the phase modulation without
       changing which channel's phase multiplies which value);
    5. O = A ⊙ e^{iΦ}, each band in its own bins, times 1/num_bands (the
       seed's mean over bands, whose supports are disjoint);
    6. ``irfft`` to ``n_fft``, the first L positions, ``Linear`` + ``LayerNorm``.

    Cost: O(L log L d) for the transforms and O(L band_block d) for the
    attention; the Python loops run over O(log L) bands and groups only.
    Output (B, L, d) in the input's dtype; positions where ``mask`` is False
    hold values that no real position depends on.
    """

    @initialised
    def __init__(self, cfg: ModelConfig, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.check = cfg.check_finite
        if causal:
            self.hyena = HyenaLongConvolution(cfg)
            return
        d = cfg.d_model
        if d % cfg.freq_heads:
            raise ValueError(f"freq_heads ({cfg.freq_heads}) must divide d_model ({d})")
        self.d_model = d
        self.heads = cfg.freq_heads
        self.max_length = cfg.max_encoder_length
        self.n_fft = next_power_of_two(cfg.max_encoder_length)
        self.bands = octave_bands(self.n_fft)
        self.band_proj = nn.ModuleList(xavier_linear(d, d) for _ in self.bands)
        self.band_norm = nn.ModuleList(nn.LayerNorm(d) for _ in self.bands)
        self.qkv = xavier_linear(d, 3 * d)
        self.out_proj = xavier_linear(d, d)
        self.out_norm = nn.LayerNorm(d)
        self.band_block = cfg.band_block
        buffers = self.derived_buffers()
        self.num_groups = len(buffers) - 1
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    def derived_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers derived from the config, so kept out of the state dict: the bin
        indices of each block group (:func:`band_block_groups`) and ``unpermute``, the
        order that puts the groups' outputs back in bin order."""
        groups = band_block_groups(self.bands, self.band_block)
        out = {f"group_index_{i}": idx for i, idx in enumerate(groups)}
        out["unpermute"] = torch.argsort(torch.cat([idx.reshape(-1) for idx in groups]))
        return out

    def block_groups(self) -> list[torch.Tensor]:
        """The (num_blocks, size) bin-index tensors, one per attention call."""
        return [getattr(self, f"group_index_{i}") for i in range(self.num_groups)]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, d), mask (B, L) bool (True = real) or None -> (B, L, d)."""
        if self.causal:
            return self.hyena(x, mask)
        batch, length, _ = x.shape
        if length > self.max_length:
            raise ValueError(f"encoder sequence length {length} > model.max_encoder_length "
                             f"({self.max_length})")
        in_dtype = x.dtype
        w_dtype = self.out_proj.weight.dtype
        x = zero_padding(x, mask)
        with fp32_region(x.device):
            spec = torch.fft.rfft(x.float(), n=self.n_fft, dim=1, norm="ortho")
            mag = spec.abs()
            nonzero = mag > 0
            phase = torch.where(nonzero, spec / torch.where(nonzero, mag, 1.0),
                                torch.ones_like(spec))
        mag = mag.to(w_dtype)
        h = torch.cat([norm(proj(mag[:, lo:hi])) for (lo, hi), proj, norm
                       in zip(self.bands, self.band_proj, self.band_norm, strict=True)], dim=1)
        a = self._band_attention(h)
        with fp32_region(x.device):
            o = a.float() * phase / len(self.bands)
            y = torch.fft.irfft(o, n=self.n_fft, dim=1, norm="ortho")[:, :length]
        y = self.out_norm(self.out_proj(y.to(w_dtype)))
        return check_finite("FrequencyHyenaAttention", y, self.check).to(in_dtype)

    def _band_attention(self, h: torch.Tensor) -> torch.Tensor:
        """Attention inside every block of every band: h (B, n_bins, d) -> (B, n_bins, d)."""
        batch, _, d = h.shape
        dh = d // self.heads
        qkv = self.qkv(h)
        outs = []
        for idx in self.block_groups():
            blocks, size = idx.shape
            g = qkv[:, idx.reshape(-1)].reshape(batch * blocks, size, 3, self.heads, dh)
            q, k, v = g.permute(2, 0, 3, 1, 4).unbind(0)
            a = F.scaled_dot_product_attention(q, k, v)
            outs.append(a.transpose(1, 2).reshape(batch, blocks * size, d))
        return torch.cat(outs, dim=1)[:, self.unpermute]

    def init_state(self, batch_size: int, device: torch.device,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Decoding state of the causal form (see :meth:`HyenaLongConvolution.init_state`)."""
        if not self.causal:
            raise RuntimeError("the encoder form of FrequencyHyenaAttention is not incremental")
        return self.hyena.init_state(batch_size, device, dtype)

    def step(self, x_t: torch.Tensor, state: dict[str, torch.Tensor],
             pos: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One decoding position of the causal form (see :meth:`HyenaLongConvolution.step`)."""
        if not self.causal:
            raise RuntimeError("the encoder form of FrequencyHyenaAttention is not incremental")
        return self.hyena.step(x_t, state, pos)


# The implicit filter's positional features: t and (cos, sin) of the
# frequencies 1..this (Hyena's PositionalEmbedding with emb_dim = 2 * 8 + 1,
# without its frequency 0, whose sine is identically 0: a feature column that
# is always 0 leaves its column of the first filter weight without gradient).
_FILTER_FREQUENCIES = 8
# Hyena's ExponentialModulation: channel c decays to 1 % of its start after a
# fraction between 0.3 (fastest channel) and 1.5 (slowest) of the filter length.
_DECAY_TARGET = 1e-2
_FAST_DECAY_FRACTION = 0.3
_SLOW_DECAY_FRACTION = 1.5


# safari's Sin activation starts its learned frequency at 10 (its Pile configs: 14): a
# filter of frequency 1 is nearly linear in the positional features, i.e. smooth and
# nearly the same for every channel.
_SIN_FREQUENCY = 10.0
# Hyena's short depthwise convolution on the projections (safari: short_filter_order 3).
_SHORT_FILTER = 3


class _Sin(nn.Module):
    """sin(ω ⊙ x) with a learned frequency per unit (Hyena's filter activation).

    Computed in float32 whatever the dtypes of ω and x; returns float32.
    """

    @initialised
    def __init__(self, width: int):
        super().__init__()
        new_parameter(self, "freq", torch.empty(width), Constant(_SIN_FREQUENCY))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq.float() * x.float())


class HyenaLongConvolution(nn.Module):
    """The causal (decoder) form of FrequencyHyenaAttention: an order-2 Hyena operator.

    For x (B, L, d), L <= ``cfg.max_decoder_length``::

        v, g1, g2 = split(ShortConv(Linear(d, 3d)(x)))   (causal depthwise, 3 taps)
        u = g1 ⊙ v                                       (conv input)
        z[t] = Σ_{s<=t} h[t-s] ⊙ u[s] + D ⊙ u[t]         (causal long conv + skip)
        y = LayerNorm(Linear(g2 ⊙ z))

    As in safari's ``HyenaOperator``: the short convolution mixes each
    projection over the last three positions, the filter h (max_decoder_length,
    d) is implicit — an MLP (width ``cfg.hyena_filter_dim``, sine activations
    whose learned frequency starts at 10) over positional features (t/Lmax and
    cos/sin of 2π f t/Lmax, f = 1..8), times a fixed per-channel exponential-decay
    window (Hyena's ExponentialModulation) — and neither the filter MLP nor D is
    weight-decayed. D starts at 0 (StripedHyena), so the long convolution, not
    a random per-channel copy of the input, carries the signal. The MLP runs in
    float32 whatever the parameters' dtype (its Linear layers are
    :class:`~liquid_dist.model.utils.Float32Linear`).

    The convolution runs in float32 through the FFT, zero-padded to
    ``next_power_of_two(2L)`` so the circular wrap-around never reaches the
    first L outputs that are kept. ``step`` computes the same sum directly,
    O(pos·d) per token.
    """

    @initialised
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, width = cfg.d_model, cfg.hyena_filter_dim
        self.d_model = d
        self.max_length = cfg.max_decoder_length
        self.check = cfg.check_finite
        self.in_proj = xavier_linear(d, 3 * d)
        # nn.Conv1d's own init, as safari's short filter
        self.short_conv = nn.Conv1d(3 * d, 3 * d, _SHORT_FILTER, groups=3 * d)
        n_features = 2 * _FILTER_FREQUENCIES + 1
        self.filter_mlp = nn.Sequential(
            xavier_linear(n_features, width, float32=True), _Sin(width),
            xavier_linear(width, width, float32=True), _Sin(width),
            xavier_linear(width, d, bias=False, float32=True),
        )
        new_parameter(self, "skip", torch.empty(d), Constant(0.0))
        no_weight_decay(*self.filter_mlp.parameters(), self.skip)
        self.out_proj = xavier_linear(d, d)
        self.out_norm = nn.LayerNorm(d)

    def long_filter(self, length: int) -> torch.Tensor:
        """The first ``length`` taps of the implicit filter, (length, d), computed in float32.

        The positional features and the decay window are built here, in
        float32, from the config: being no buffers, no cast of the module
        (``.to(torch.bfloat16)`` casts floating buffers too) can round them.
        """
        device = self.skip.device
        t = torch.arange(length, device=device, dtype=torch.float32)[:, None] / self.max_length
        freqs = torch.arange(1, _FILTER_FREQUENCIES + 1, device=device, dtype=torch.float32)
        angles = 2 * math.pi * freqs * t
        features = torch.cat([t, torch.cos(angles), torch.sin(angles)], dim=1)
        rates = torch.linspace(math.log(1 / _DECAY_TARGET) / _SLOW_DECAY_FRACTION,
                               math.log(1 / _DECAY_TARGET) / _FAST_DECAY_FRACTION,
                               self.d_model, device=device)
        return self.filter_mlp(features) * torch.exp(-t * rates)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, d) -> (B, L, d), causal; positions where ``mask`` is False are zeroed first."""
        length = x.shape[1]
        if length > self.max_length:
            raise ValueError(f"decoder sequence length {length} > model.max_decoder_length "
                             f"({self.max_length})")
        in_dtype = x.dtype
        w_dtype = self.out_proj.weight.dtype
        x = zero_padding(x, mask)
        z = zero_padding(self.in_proj(x.to(w_dtype)), mask).transpose(1, 2)
        z = self.short_conv(F.pad(z, (_SHORT_FILTER - 1, 0))).transpose(1, 2)
        v, g1, g2 = z.chunk(3, dim=-1)
        h = self.long_filter(length)
        with fp32_region(x.device):
            u = g1.float() * v.float()
            n = next_power_of_two(2 * length)
            spec = torch.fft.rfft(u, n=n, dim=1) * torch.fft.rfft(h, n=n, dim=0)
            conv = torch.fft.irfft(spec, n=n, dim=1)[:, :length]
            y = g2.float() * (conv + self.skip.float() * u)
        y = self.out_norm(self.out_proj(y.to(w_dtype)))
        return check_finite("HyenaLongConvolution", y, self.check).to(in_dtype)

    def init_state(self, batch_size: int, device: torch.device,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Empty decoding state.

        ``short``: (B, 2, 3d) the last two projections (zeros = the causal
        left padding), in ``dtype``. ``u``: (B, max_decoder_length, d) float32
        history of the conv input
        (slot s holds u[s] once position s has been stepped; the position
        argument of ``step`` is the fill level). ``filter_rev``: the implicit
        filter, time-reversed, computed once here and expanded over the batch
        (no copy until a beam reorder), so ``step`` does not rerun the filter
        MLP. ``u`` and ``filter_rev`` are float32 whatever ``dtype`` is, as the
        convolution is.
        """
        h = self.long_filter(self.max_length).to(device)
        return {
            "short": torch.zeros(batch_size, _SHORT_FILTER - 1, 3 * self.d_model,
                                 device=device, dtype=dtype),
            "u": torch.zeros(batch_size, self.max_length, self.d_model, device=device),
            "filter_rev": h.flip(0).unsqueeze(0).expand(batch_size, -1, -1),
        }

    def step(self, x_t: torch.Tensor, state: dict[str, torch.Tensor],
             pos: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x_t (B, 1, d) at position ``pos`` -> (y_t (B, 1, d), new state).

        Equals ``forward`` at ``pos`` given the same earlier inputs. The passed
        state is not modified (the history is written out of place).
        """
        if not 0 <= pos < self.max_length:
            raise ValueError(f"decoder position {pos} outside [0, model.max_decoder_length="
                             f"{self.max_length})")
        w_dtype = self.out_proj.weight.dtype
        z = self.in_proj(x_t.to(w_dtype))
        window = torch.cat([state["short"], z.to(state["short"].dtype)], dim=1)
        z = self.short_conv(window.to(w_dtype).transpose(1, 2)).transpose(1, 2)
        v, g1, g2 = z.chunk(3, dim=-1)
        with fp32_region(x_t.device):
            u_t = g1.float() * v.float()
            where = torch.tensor([pos], device=x_t.device)
            history = state["u"].index_copy(1, where, u_t)
            taps = state["filter_rev"][:, self.max_length - 1 - pos:]
            conv = (taps * history[:, :pos + 1]).sum(dim=1, keepdim=True)
            y = g2.float() * (conv + self.skip.float() * u_t)
        y = self.out_norm(self.out_proj(y.to(w_dtype)))
        y = check_finite("HyenaLongConvolution", y, self.check).to(x_t.dtype)
        return y, {"short": window[:, 1:], "u": history, "filter_rev": state["filter_rev"]}
