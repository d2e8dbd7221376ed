"""The style-transfer engine (Gatys et al.): PyTorch only, no knowledge of queues or storage.

    cfg = preset("default", size=256, iterations=200)
    model = VGGFeatures.from_weights(load_weights("imagenet"), pooling=cfg.pooling)
    result = stylize(content, [style], cfg, model=model, callback=print)
    result.image.save("out.png"); json.dump(result.metadata(), ...)
"""

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
