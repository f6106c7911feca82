"""The ``megablocks`` expert-compute backend: MegaBlocks' dropless grouped GEMM.

MegaBlocks (0.10.0 on PyPI: source only, pinned to ``torch==2.7.0``) builds
only with CUDA (docs/design.md, "Platform facts"), so it is imported lazily,
only when ``moe.backend: megablocks`` runs; anywhere else that backend fails
with :data:`MEGABLOCKS_ERROR`.

Weight layout. MegaBlocks' ``GroupedMLP`` stores ``w1`` and ``w2`` both as
``(E * F, d)`` and computes ``act(x @ w1[e].T) @ w2[e]`` for expert e (with
``w1[e] = w1.view(E, F, d)[e]``); it has no biases. The project's fused layout
is ``w1 (E, d, F)``, ``w2 (E, F, d)`` (liquid_dist/model/moe.py), so

* ``to_megablocks_layout``:  ``w1 -> w1.transpose(1, 2).reshape(E * F, d)``,
  ``w2 -> w2.reshape(E * F, d)``;
* ``from_megablocks_layout``: the inverse views, bit for bit (pure reshapes).

The adapter keeps the project's parameters (one layout for every backend):
it views them in MegaBlocks' layout for the GEMMs and adds the biases itself.

Host synchronisation: MegaBlocks' ``gmm`` takes the group sizes as a CPU
tensor, so this backend reads them on the host once per call (the other
backends read nothing), and it computes only the assignment rows, which it
slices off with that host count.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F

MEGABLOCKS_ERROR = (
    "megablocks backend requires MegaBlocks on CUDA (pip install megablocks on a GPU "
    "machine; it pins torch==2.7.0); use moe.backend='auto' (the default: grouped_mm "
    "where it is fast, the same dropless computation), 'grouped_mm' or 'loop'"
)


def to_megablocks_layout(w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project layout ``w1 (E, d, F)``, ``w2 (E, F, d)`` -> MegaBlocks' two ``(E * F, d)``."""
    num_experts, d_model, ffn = w1.shape
    return (w1.transpose(1, 2).reshape(num_experts * ffn, d_model),
            w2.reshape(num_experts * ffn, d_model))


def from_megablocks_layout(w1_mb: torch.Tensor, w2_mb: torch.Tensor,
                           num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MegaBlocks' ``(E * F, d)`` pair -> the project's ``w1 (E, d, F)``, ``w2 (E, F, d)``."""
    ffn = w1_mb.shape[0] // num_experts
    d_model = w1_mb.shape[1]
    return (w1_mb.reshape(num_experts, ffn, d_model).transpose(1, 2).contiguous(),
            w2_mb.reshape(num_experts, ffn, d_model).contiguous())


def _grouped_gemm_ops() -> Any:
    try:
        gg = importlib.import_module("megablocks.grouped_gemm_util")
    except Exception as exc:  # ImportError, or a CUDA extension that fails to load
        raise RuntimeError(f"{MEGABLOCKS_ERROR} ({type(exc).__name__}: {exc})") from exc
    if not gg.grouped_gemm_is_available() or not torch.cuda.is_available():
        raise RuntimeError(f"{MEGABLOCKS_ERROR} (grouped_gemm or CUDA unavailable)")
    return gg.ops


def megablocks_expert_forward(x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor,
                              w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor | None,
                              b2: torch.Tensor | None) -> torch.Tensor:
    """:func:`liquid_dist.model.moe.expert_forward` through MegaBlocks' grouped GEMM.

    Same inputs, outputs and promises: the first ``tokens_per_expert.sum()``
    rows of ``x_sorted`` grouped by expert, ``tokens_per_expert`` the group
    sizes; rows after the groups are computed by no expert and their output
    rows are exactly 0. Reads the group sizes on the host (one sync).
    RuntimeError with :data:`MEGABLOCKS_ERROR` when MegaBlocks or CUDA is missing.
    """
    ops = _grouped_gemm_ops()
    batch_sizes = tokens_per_expert.cpu()  # grouped_gemm takes the sizes on the host
    assigned = int(batch_sizes.sum())
    x = x_sorted[:assigned].contiguous()
    expert_ids = torch.repeat_interleave(
        torch.arange(w1.shape[0], device=x_sorted.device), tokens_per_expert,
        output_size=assigned)
    if w2 is None:  # linear experts: one GEMM with w1 (E, d, d) as it is
        y = ops.gmm(x, w1, batch_sizes) + b1[expert_ids]
    else:
        num_experts, d_model, ffn = w1.shape
        w1_mb, w2_mb = to_megablocks_layout(w1, w2)
        h = ops.gmm(x, w1_mb.view(num_experts, ffn, d_model), batch_sizes,
                    trans_b=True) + b1[expert_ids]
        y = ops.gmm(F.gelu(h), w2_mb.view(num_experts, ffn, d_model), batch_sizes) + b2[expert_ids]
    return F.pad(y, (0, 0, 0, x_sorted.shape[0] - assigned))
