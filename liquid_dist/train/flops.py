"""Model FLOPs of LiquidFoundationModelOptimized, for throughput and MFU.

The formula (docs/training.md, "FLOPs and MFU") counts multiply-adds as 2
FLOPs, per training sample of ``Le`` encoder and ``Ld`` decoder positions:

* weights: ``2 x numel`` per position that uses them, for every weight matrix
  (Linear, Conv1d, LSTM, expert tensors): ``encoder.*`` per encoder position,
  ``decoder.*`` per decoder position, except the decoder cross-attention K/V
  projections, which read the encoder output (``Le`` positions per decoder
  layer); expert weights x ``top_k / num_experts`` (the nominal k: dynamic k
  may route a token to up to ``k_max`` experts); the output head ``d x V``
  per decoder position; embedding lookups, biases and norms count 0;
* attention scores and values: ``4 d K`` per query for ``K`` visible keys:
  ``K = min(2w+1, Le)`` in the encoder, ``min(w+1, Ld)`` in the decoder, ``Le``
  for cross-attention, ``band_block`` for the spectral attention over the
  ``n_fft/2+1`` frequency bins of the encoder embedding;
* FFTs: ``2.5 n log2(n)`` per channel and transform: four of length
  ``next_pow2(max_encoder_length)`` in the encoder embedding (two in the
  frequency module, two in the compression), three of length
  ``next_pow2(2 Ld)`` in the decoder's Hyena convolution.

A component that ``model.ablate`` removes counts nothing: its weights are not in
the model, and the spectral attention and FFTs of ``frequency`` / ``compression``
are left out of the sums above.

Training FLOPs = 3 x forward (backward = 2 x forward); the recomputation of
activation checkpointing is not counted (model FLOPs, not hardware FLOPs).
MFU = training FLOPs per second / (peak FLOPs per device x devices).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from liquid_dist.config import ModelConfig, next_power_of_two

# Dense peak FLOP/s per device by precision, from the vendors' data sheets (no sparsity).
_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 67e12}),
    ("H100", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
)
PEAK_ENV = "LIQUID_PEAK_FLOPS"


@dataclass(frozen=True)
class FlopsBreakdown:
    """Forward FLOPs of one sample by kind; ``training`` is 3 x the sum."""

    weights: float
    attention: float
    fft: float

    @property
    def forward(self) -> float:
        return self.weights + self.attention + self.fft

    @property
    def training(self) -> float:
        return 3.0 * self.forward


def _weight_share(name: str, p: torch.Tensor, cfg: ModelConfig) -> tuple[str, float]:
    """Which positions apply weight ``name`` ("encoder", "decoder" or "" for none) and how
    large a share of them (``top_k / num_experts`` for expert weights, else 1)."""
    # the fused expert biases b1 (E, F) and b2 (E, d) are 2-D but biases all the same
    if p.dim() < 2 or name.endswith(("token_embedding.weight", "position_embedding.weight",
                                     ".moe.b1", ".moe.b2")):
        return "", 0.0
    expert = name.endswith((".moe.w1", ".moe.w2"))
    share = cfg.moe.top_k / cfg.moe.num_experts if expert else 1.0
    if name.startswith("encoder."):
        return "encoder", share
    if ".cross_attn.k_proj." in name or ".cross_attn.v_proj." in name:
        return "encoder", share
    if name.startswith("decoder."):
        return "decoder", share
    return "", 0.0


def _next_pow2(n: np.ndarray) -> np.ndarray:
    return np.exp2(np.ceil(np.log2(np.maximum(n, 1))))


class ModelFlops:
    """Forward FLOPs of one sample as a function of its (encoder, decoder) lengths.

    Built once per model config (one model on the meta device); evaluating it
    is a handful of numpy operations, so the trainer counts every batch at its
    own shape and every row at its real lengths.
    """

    def __init__(self, cfg: ModelConfig):
        from liquid_dist.model import LiquidFoundationModelOptimized

        if not isinstance(cfg.vocab_size, int):
            raise ValueError("resolve model.vocab_size before counting FLOPs")
        self.cfg = cfg
        with torch.device("meta"):
            model = LiquidFoundationModelOptimized(cfg)
        per = {"encoder": 0.0, "decoder": 2.0 * cfg.d_model * cfg.vocab_size, "": 0.0}
        for n, p in model.named_parameters():
            side, share = _weight_share(n, p, cfg)
            per[side] += 2.0 * p.numel() * share
        self._per_encoder_position = per["encoder"]
        self._per_decoder_position = per["decoder"]

    def forward(self, encoder_length, decoder_length) -> FlopsBreakdown:
        """Forward FLOPs of samples of ``encoder_length`` (Le) and ``decoder_length`` (Ld)
        positions; scalars or numpy arrays (one entry per sample), as the fields hold."""
        cfg = self.cfg
        le = np.asarray(encoder_length, dtype=np.float64)
        ld = np.asarray(decoder_length, dtype=np.float64)
        d, w = cfg.d_model, cfg.window
        weights = self._per_encoder_position * le + self._per_decoder_position * ld
        n_fft_enc = next_power_of_two(cfg.max_encoder_length)
        bins = n_fft_enc // 2 + 1
        frequency = cfg.keeps("frequency")
        attention = (cfg.n_encoder_layers * 4.0 * d * np.minimum(2 * w + 1, le) * le
                     + cfg.n_decoder_layers * 4.0 * d * (np.minimum(w + 1, ld) * ld + le * ld)
                     + frequency * 4.0 * d * min(cfg.band_block, bins) * bins)
        n_fft_dec = _next_pow2(2 * ld)
        enc_ffts = 2 * frequency + 2 * cfg.keeps("compression")
        fft = d * (enc_ffts * 2.5 * n_fft_enc * math.log2(n_fft_enc)
                   + 3 * frequency * 2.5 * n_fft_dec * np.log2(n_fft_dec))
        if weights.ndim == 0:
            return FlopsBreakdown(weights=float(weights), attention=float(attention),
                                  fft=float(fft))
        return FlopsBreakdown(weights=weights, attention=attention, fft=fft)

    def training(self, encoder_lengths, decoder_lengths) -> float:
        """Training FLOPs summed over samples of the given lengths (arrays, one per sample)."""
        return float(np.sum(self.forward(encoder_lengths, decoder_lengths).training))

    def batch_counts(self, batch: dict[str, Any]) -> list[float]:
        """A host batch's real encoder tokens, real decoder targets, positions computed
        (padding included) and the training FLOPs of the positions and of the real tokens
        (the trainer's COUNT_KEYS, in that order)."""
        real_enc = batch["encoder_attention_mask"].sum(1).numpy()
        real_dec = (batch["labels"] != -100).sum(1).numpy()
        b, le = batch["encoder_input_ids"].shape
        ld = batch["decoder_input_ids"].shape[1]
        return [float(real_enc.sum()), float(real_dec.sum()), float(b * (le + ld)),
                self.training(np.full(b, le), np.full(b, ld)),
                self.training(real_enc, real_dec)]


def forward_flops(cfg: ModelConfig, encoder_length: int, decoder_length: int) -> FlopsBreakdown:
    """Forward FLOPs of one (encoder_length, decoder_length) sample; see the module docstring."""
    return ModelFlops(cfg).forward(encoder_length, decoder_length)


def peak_flops_per_device(device: torch.device, precision: str) -> Optional[float]:
    """Peak dense FLOP/s of one device, or None when unknown (e.g. CPUs).

    ``LIQUID_PEAK_FLOPS`` (FLOP/s per device) overrides the table.
    """
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV])
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device), precision)


def peak_flops_of(name: str, precision: str) -> Optional[float]:
    """Peak dense FLOP/s of the GPU model ``name`` (e.g. "NVIDIA H200", "h100"), or None."""
    for key, peaks in _PEAKS:
        if key in name.upper():
            return peaks.get(precision)
    return None
