"""``train.compile: true``: every ImprovedTransformerBlock as one compiled graph.

Applied from outside the model, as torchtitan applies it per transformer
block: each block's ``forward`` becomes ``torch.compile(forward,
fullgraph=True)``. Parameter names and the module tree stay as they are, so
checkpoints, conversion and DeepSpeed see the same model; the block's own
hooks (the block monitor, and ZeRO-3's parameter gathering once the trainer
makes compiled blocks ZeRO-3 leaf modules) run outside the graph.
``fullgraph=True`` makes a graph break an error at the first step instead of a
silent slow path.

Outside the compiled regions stay the embeddings (FrequencyHyenaAttention's
FFTs and spectral attention over octave bands), the EnhancedLSTM (a cuDNN /
ATen recurrence that dynamo runs as one opaque call anyway) and the output
head: they run once per forward, not once per layer.

Blocks of one kind (encoder or decoder) share their compiled code: dynamo
guards on the module's class and attributes, not its identity. A new batch
shape (one per objective, docs/data.md), train vs eval mode, and the causal
flag each add an entry; ``RECOMPILE_LIMIT`` leaves room for them, past which
dynamo would silently run a block eagerly.
"""

from __future__ import annotations

import torch
from torch import nn

RECOMPILE_LIMIT = 64


def compile_blocks(model: nn.Module) -> int:
    """Compile the ``forward`` of every ImprovedTransformerBlock of ``model`` in place.

    Returns the number of blocks compiled. Idempotent per block.
    """
    from liquid_dist.model.block import ImprovedTransformerBlock

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    count = 0
    for module in model.modules():
        if isinstance(module, ImprovedTransformerBlock) and "forward" not in vars(module):
            module.forward = torch.compile(module.forward, fullgraph=True)
            count += 1
    return count
