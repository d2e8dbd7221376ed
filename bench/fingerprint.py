"""Fingerprints of seeded CPU runs: the check that a refactor changed no result, bit for bit.

    python -m bench.fingerprint > before.json   # on the old tree
    python -m bench.fingerprint > after.json    # on the new one; then: cmp before.json after.json

Random weights (random:0), the sample images at 48 to 80 px, a few steps of every preset and of
the code paths a result can take: multi-scale, EMA and TV, luminance-only with blended styles,
noise start, stop-and-resume, GPU-style batches, and the service's one-scale-per-task chain.
The sha256 of each output image and the exact (hex) losses of its history are printed as JSON.
"""
import hashlib
import json
import sys

import torch
from PIL import Image

from stylequeue.engine import BatchItem, OptimState, VGGFeatures, preset, stylize, stylize_batch
from stylequeue.engine.weights import load_weights

torch.set_num_threads(2)

def img(path, side):
    im = Image.open(path).convert("RGB")
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    return im

C = img("examples/content/chelsea.jpg", 80)
C2 = img("examples/content/astronaut.jpg", 80).resize(C.size)
S = img("examples/style/starry_night.jpg", 80)
S2 = img("examples/style/the_scream.jpg", 80)
W = load_weights("random:0")
MODELS = {p: VGGFeatures.from_weights(W, pooling=p) for p in ("avg", "max")}

def h(im):
    return hashlib.sha256(im.tobytes()).hexdigest()[:16]

def fp(result):
    return {"image": h(result.image), "size": list(result.image.size),
            "history": [[r["iteration"], r["loss"].hex(), r["content_loss"].hex(), r["style_loss"].hex()] for r in result.history],
            "state_image": hashlib.sha256(result.state.image.numpy().tobytes()).hexdigest()[:16],
            "state_iteration": result.state.iteration, "state_scale": result.state.scale_index}

CASES = {
    "default": dict(preset="default", size=48, iterations=8, progress_every=2),
    "seed": dict(preset="seed", size=48, iterations=8, progress_every=2),
    "gatys": dict(preset="gatys", size=48, iterations=6, progress_every=2),
    "default_ms": dict(preset="default", size=64, iterations=4, scales=3, min_size=32, progress_every=2),
    "gatys_ms": dict(preset="gatys", size=64, iterations=3, scales=2, min_size=40, progress_every=1),
    "ema_tv": dict(preset="default", size=48, iterations=6, ema_decay=0.5, tv_weight=10.0, progress_every=3),
    "colors_blend": dict(preset="default", size=48, iterations=5, original_colors=True, style_blend_weights=(0.7, 0.3), progress_every=5),
    "noise": dict(preset="default", size=48, iterations=5, init="noise", seed=3, progress_every=5),
}

def cfg(spec):
    spec = dict(spec); name = spec.pop("preset")
    return preset(name, device="cpu", **spec)

out = {}
for name, spec in CASES.items():
    c = cfg(spec)
    styles = [S, S2] if name == "colors_blend" else [S]
    out[name] = fp(stylize(C, styles, c, model=MODELS[c.pooling]))

# stop then resume
c = cfg(CASES["default_ms"]).replace(checkpoint_every=0)
n = {"k": 0}
def stop():
    n["k"] += 1
    return n["k"] > 6
r1 = stylize(C, [S], c, model=MODELS[c.pooling], should_stop=stop)
state = OptimState.from_bytes(r1.state.to_bytes())
r2 = stylize(C, [S], c, model=MODELS[c.pooling], resume=state)
out["resume_ms"] = {"first": fp(r1), "second": fp(r2)}

# batched
c = cfg(CASES["default_ms"])
items = [BatchItem(C, [S]), BatchItem(C2, [S2]), BatchItem(C, [S2], config=c.replace(seed=5, init="noise"))]
out["batch3_ms"] = [fp(r) for r in stylize_batch(items, c, model=MODELS[c.pooling])]
c = cfg(CASES["seed"])
out["batch2_seed"] = [fp(r) for r in stylize_batch([BatchItem(C, [S]), BatchItem(C2, [S])], c, model=MODELS[c.pooling])]

# the service's chain: one scale per call, each from the previous call's final state
for name in ("default_ms", "gatys_ms"):
    job = cfg(CASES[name])
    saved = None
    fps = []
    for step in range(job.scales):
        res = stylize(C, [S], job, model=MODELS[job.pooling], resume=saved, last_scale=step)
        how = "fresh" if saved is None else "carried"
        saved = OptimState.from_bytes(res.state.to_bytes())
        fps.append({"how": how, "image": h(res.image)})
    out["chain_" + name] = fps
json.dump(out, sys.stdout, indent=1, sort_keys=True)
