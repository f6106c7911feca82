"""Small building blocks shared by the model's components.

Initialisation follows the seed (§4): Xavier-normal for linear maps
(N(0, 2/(n_in+n_out))), Kaiming-normal for convolutions followed by a
rectifier-like activation (N(0, 2/n_in)), zero biases; a residual branch's
output projection is scaled by :func:`residual_scale`, and a branch placed on
a path that had none starts at zero (:func:`zero_gain`), docs/model.md
"Initialisation". These helpers attach the rules (liquid_dist.model.init);
the values are drawn once the whole model exists (``init_parameters``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .init import Constant, KaimingNormal, XavierNormal, new_parameter, set_init


class Float32Linear(nn.Linear):
    """An ``nn.Linear`` that computes in float32, whatever its parameters' dtype.

    ``forward(x)`` returns ``x @ W.T + b`` in float32 under any ambient
    autocast, for parameters in any floating dtype (DeepSpeed's bf16 casts
    every parameter to bf16). The weights are upcast inside this module's own
    forward, where ZeRO-3 has gathered them; gradients reach the parameters in
    their own dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float(), bias)


def xavier_linear(in_features: int, out_features: int, bias: bool = True,
                  float32: bool = False, scale: float = 1.0) -> nn.Linear:
    """An ``nn.Linear`` with Xavier-normal weight (its std times ``scale``) and zero bias.

    ``float32``: a :class:`Float32Linear`, which computes in float32. ``scale``:
    :func:`residual_scale` for a residual branch's output projection.
    """
    layer = (Float32Linear if float32 else nn.Linear)(in_features, out_features, bias=bias)
    set_init(layer, "weight", XavierNormal(scale))
    if bias:
        set_init(layer, "bias", Constant(0.0))
    return layer


def residual_scale(n_layers: int) -> float:
    """``1 / sqrt(2 · n_layers)``: the init scale of a residual branch's output projection
    in a stack of ``n_layers`` blocks (GPT-2, safari, Mamba), so that the residual stream's
    variance at initialisation does not grow with depth."""
    return (2 * n_layers) ** -0.5


def zero_gain(module: nn.Module, name: str, width: int) -> nn.Parameter:
    """Register ``module.<name>``, a per-channel gain (width,) that starts at 0: a residual
    branch ``x + gain ⊙ f(x)`` starts as the identity and learns how much of ``f`` to add
    (LayerScale at 0)."""
    return new_parameter(module, name, torch.empty(width), Constant(0.0))


def no_weight_decay(*params: nn.Parameter) -> None:
    """Mark parameters that AdamW must not decay whatever their shape (read by
    :func:`param_groups`)."""
    for p in params:
        p._no_weight_decay = True


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: matrices decay by ``weight_decay``; biases, norm gains,
    scalars and parameters marked with :func:`no_weight_decay` keep their scale."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)]
    chosen = {id(p) for p in decay}
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in chosen], "weight_decay": 0.0}]


def kaiming_conv1d(in_channels: int, out_channels: int, kernel_size: int, **kwargs) -> nn.Conv1d:
    """An ``nn.Conv1d`` with Kaiming-normal (fan-in) weight and zero bias."""
    conv = nn.Conv1d(in_channels, out_channels, kernel_size, **kwargs)
    set_init(conv, "weight", KaimingNormal())
    if conv.bias is not None:
        set_init(conv, "bias", Constant(0.0))
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


def replace_nonfinite(name: str, x: torch.Tensor,
                      strict: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x with every NaN and ±Inf set to 0, how many were set)``.

    The count is an int64 scalar tensor on ``x``'s device (no host sync).
    Applied before a tensor reaches a LayerNorm, the 0 changes one value of
    one position and nothing else: a row holding ±Inf normalises to NaN, and
    one holding ``torch.nan_to_num``'s ±3.4e38 overflows the variance and
    normalises to all zeros, and the sequence-mixing layers after the
    LayerNorm would spread either to the neighbouring positions. In strict
    mode, raise :class:`NonFiniteError` naming ``name`` instead (see
    :func:`check_finite`); the count is then 0.
    """
    if strict:
        return check_finite(name, x, True), x.new_zeros((), dtype=torch.int64)
    bad = ~torch.isfinite(x)
    return x.masked_fill(bad, 0.0), bad.sum()


def zero_padding(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the positions where ``mask`` (B, L; True = real token) is False.

    Every sequence-mixing operation of the encoder and the decoder applies this
    to its input, so that what padding holds can never reach a real position.
    """
    if mask is None:
        return x
    return x * mask.unsqueeze(-1).to(x.dtype)
