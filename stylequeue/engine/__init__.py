"""The style-transfer engine (Gatys et al.): PyTorch only, no knowledge of queues or storage.

    cfg = preset("default", size=256, iterations=200)
    model = VGGFeatures.from_weights(load_weights("imagenet"), pooling=cfg.pooling)
    result = stylize(content, [style], cfg, model=model, callback=print)
    result.image.save("out.png"); json.dump(result.metadata(), ...)
    results = stylize_batch([BatchItem(c, [style]) for c in contents], cfg, model=model)  # same size
"""

from stylequeue.engine.config import StyleConfig
from stylequeue.engine.losses import ContentLoss, StyleLoss, StyleTransferLoss, TVLoss, gram_matrix
from stylequeue.engine.presets import PRESETS, preset
from stylequeue.engine.state import OptimState
from stylequeue.engine.stylize import Progress, StyleResult, scale_sizes, stylize
from stylequeue.engine.batch import BatchItem, stylize_batch, stylize_many  # after stylize: it builds on it
from stylequeue.engine.targets import LruTargetCache, TargetCache, style_target_key
from stylequeue.engine.vgg import LAYER_NAMES, VGGFeatures

__all__ = [
    "BatchItem",
    "LAYER_NAMES",
    "LruTargetCache",
    "PRESETS",
    "ContentLoss",
    "OptimState",
    "Progress",
    "StyleConfig",
    "StyleLoss",
    "StyleResult",
    "StyleTransferLoss",
    "TVLoss",
    "TargetCache",
    "VGGFeatures",
    "gram_matrix",
    "preset",
    "scale_sizes",
    "style_target_key",
    "stylize",
    "stylize_batch",
    "stylize_many",
]
