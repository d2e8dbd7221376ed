"""The style-transfer engine (Gatys et al.): PyTorch only, no knowledge of queues or storage.

    cfg = preset("default", size=256, iterations=200)
    model = VGGFeatures.from_weights(load_weights("imagenet"), pooling=cfg.pooling)
    result = stylize(content, [style], cfg, model=model, callback=print)
    result.image.save("out.png"); json.dump(result.metadata(), ...)
    results = stylize_batch([BatchItem(c, [style]) for c in contents], cfg, model=model)  # one size
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> defining module. Imported on first use (PEP 562), so a producer that only
# validates a job spec (config, presets, layer names) never pays for importing torch.
_EXPORTS: dict[str, str] = {
    "StyleConfig": "config",
    "PRESETS": "presets",
    "preset": "presets",
    "NETWORKS": "network",
    "Network": "network",
    "ContentLoss": "losses",
    "StyleLoss": "losses",
    "StyleTransferLoss": "losses",
    "TVLoss": "losses",
    "gram_matrix": "losses",
    "OptimState": "state",
    "Progress": "result",
    "StyleResult": "result",
    "scale_sizes": "config",
    "stylize": "transfer",
    "BatchItem": "transfer",
    "stylize_batch": "transfer",
    "stylize_many": "transfer",
    "LruTargetCache": "targets",
    "TargetCache": "targets",
    "style_target_key": "targets",
    "VGGFeatures": "vgg",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stylequeue.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"stylequeue.engine.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "BatchItem",
    "LruTargetCache",
    "NETWORKS",
    "Network",
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
