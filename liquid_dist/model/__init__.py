"""LiquidFoundationModelOptimized and its components, under the seed's class names.

The model knows nothing of parallelism: distributed training wraps it from
outside (liquid_dist.parallel, liquid_dist.train).
"""

from .attention import CrossAttention, EnhancedLocalAttentionWithGQA, local_attention
from .block import ImprovedTransformerBlock
from .conv import DeformableConv1d, OptimizedGatedConvolution
from .embedding import EnhancedLiquidEmbedding
from .frequency import FrequencyHyenaAttention
from .generation import GenerationConfig
from .memory import EnhancedLSTM
from .model import (
    BidirectionalEncoder,
    LiquidDecoder,
    LiquidFoundationModelOptimized,
    ModelOutput,
)
from .moe import MoELayer
from .utils import NonFiniteError

__all__ = [
    "BidirectionalEncoder",
    "CrossAttention",
    "DeformableConv1d",
    "EnhancedLSTM",
    "EnhancedLiquidEmbedding",
    "EnhancedLocalAttentionWithGQA",
    "FrequencyHyenaAttention",
    "GenerationConfig",
    "ImprovedTransformerBlock",
    "LiquidDecoder",
    "LiquidFoundationModelOptimized",
    "ModelOutput",
    "MoELayer",
    "NonFiniteError",
    "OptimizedGatedConvolution",
    "local_attention",
]
