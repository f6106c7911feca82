"""Small building blocks shared by the model's components.

Initialisation follows the seed (§4): Xavier-normal for linear maps
(N(0, 2/(n_in+n_out))), Kaiming-normal for convolutions followed by a
rectifier-like activation (N(0, 2/n_in)), zero biases.
"""

from __future__ import annotations

import torch
from torch import nn


def xavier_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """An ``nn.Linear`` with Xavier-normal weight and zero bias."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.xavier_normal_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def kaiming_conv1d(in_channels: int, out_channels: int, kernel_size: int, **kwargs) -> nn.Conv1d:
    """An ``nn.Conv1d`` with Kaiming-normal (fan-in) weight and zero bias."""
    conv = nn.Conv1d(in_channels, out_channels, kernel_size, **kwargs)
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class NonFiniteError(FloatingPointError):
    """Raised in strict mode when an activation holds NaN or Inf."""


def check_finite(name: str, tensor: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Return ``tensor``; in strict mode raise NonFiniteError naming ``name``.

    Strict mode costs a device sync per call, so it is off unless
    ``model.check_finite`` is set.
    """
    if enabled and not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise NonFiniteError(f"non-finite activation in {name}: {bad} of {tensor.numel()} values")
    return tensor


def zero_padding(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the positions where ``mask`` (B, L; True = real token) is False.

    Every sequence-mixing operation of the encoder and the decoder applies this
    to its input, so that what padding holds can never reach a real position.
    """
    if mask is None:
        return x
    return x * mask.unsqueeze(-1).to(x.dtype)
