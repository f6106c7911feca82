"""liquid_dist: distributed pretraining of the LiquidFoundationModelOptimized encoder-decoder."""

__version__ = "0.1.0"
