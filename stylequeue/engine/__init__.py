"""The style-transfer engine (Gatys et al.): PyTorch only, no knowledge of queues or storage."""

from stylequeue.engine.config import StyleConfig
from stylequeue.engine.losses import ContentLoss, StyleLoss, StyleTransferLoss, TVLoss, gram_matrix
from stylequeue.engine.presets import PRESETS, preset
from stylequeue.engine.state import OptimState
from stylequeue.engine.stylize import Progress, StyleResult, scale_sizes, stylize
from stylequeue.engine.vgg import LAYER_NAMES, VGGFeatures

__all__ = [
    "LAYER_NAMES",
    "PRESETS",
    "ContentLoss",
    "OptimState",
    "Progress",
    "StyleConfig",
    "StyleLoss",
    "StyleResult",
    "StyleTransferLoss",
    "TVLoss",
    "VGGFeatures",
    "gram_matrix",
    "preset",
    "scale_sizes",
    "stylize",
]
