"""A faithful re-creation of the seed document's style-transfer loop, for benchmarks only.

The seed (../shared/seed/README.md) describes yunjey's pytorch-tutorial
``tutorials/03-advanced/neural_style_transfer/main.py``. This module redoes that loop, in our own
code, *with its costs and defects kept*, so the engine can be measured against what a user would
run instead:

* ``SeedVGG`` runs ALL 37 modules of ``vgg19().features`` every call (pool5 and conv5_2..conv5_4
  included, though no loss reads them) and returns the outputs of modules 0, 5, 10, 19, 28.
* Those modules are conv1_1, conv2_1, conv3_1, conv4_1, conv5_1, but torchvision builds
  ``vgg19().features`` with ``ReLU(inplace=True)``: the ReLU that follows each selected conv
  overwrites the very tensor the list holds. The seed's "conv" features are therefore, in effect,
  relu1_1 .. relu5_1. We keep torchvision's modules as they are, so this happens here too.
* The VGG parameters keep ``requires_grad=True`` (the tutorial never freezes them): every step
  builds the graph for, and computes, weight gradients (never used, accumulated forever).
* Content and style features are RECOMPUTED every step (three VGG passes per step).
* The style image is resized with ``shape=[content.size(2), content.size(3)]`` passed to PIL's
  ``resize``, which takes (width, height): a non-square content gives a TRANSPOSED style image
  (for a 400x266 content, the style becomes 266x400). ``transposed_style=False`` fixes only that.
* The optimised tensor is the ImageNet-normalised image, unclamped; Adam lr 0.003, betas
  (0.5, 0.999); loss = content + 100 * style; content = mean((F - C)^2) per layer; style =
  mean((F F^T - S S^T)^2) / (c*h*w) with an un-normalised Gram matrix.

Pillow >= 10 has no ``Image.ANTIALIAS``; it was an alias of ``LANCZOS``, which we use.

The seed's network is VGG19; ``network=VGG16`` runs the same loop on a VGG16 (its conv1_1 ..
conv5_1 are modules 0, 5, 10, 17, 24), for the quality benchmark's real VGG16 features.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.models import vgg16, vgg19

from stylequeue.engine.network import VGG19, Network, features_only

SEED_CONVS = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1")  # relu-overwritten, see above
SEED_LR = 0.003
SEED_BETAS = (0.5, 0.999)
SEED_STYLE_WEIGHT = 100.0
SEED_MAX_SIZE = 400
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The tutorial's approximate inverse of Normalize, used when it saves an image.
SEED_DENORM_MEAN = (-2.12, -2.04, -1.80)
SEED_DENORM_STD = (4.37, 4.46, 4.44)


class SeedVGG(nn.Module):
    """The tutorial's ``VGGNet``: all 37 modules, five selected outputs, parameters NOT frozen."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], network: Network = VGG19) -> None:
        super().__init__()
        self.select = [str(network.layer(name).index) for name in SEED_CONVS]
        # ReLU(inplace=True), as torchvision builds it.
        self.vgg = (vgg19 if network is VGG19 else vgg16)(weights=None).features
        self.vgg.load_state_dict(features_only(state_dict))
        # Modules up to relu5_1: the last that touches a selected output (SeedLoop's shortcut).
        self.shortcut_modules = network.layer("relu5_1").index + 1

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Five (1, C, h, w) maps; every module runs, as in the tutorial."""
        features = []
        for name, layer in self.vgg._modules.items():
            x = layer(x)
            if name in self.select:
                features.append(x)
        return features


def to_normalized(img: Image.Image) -> torch.Tensor:
    """``transforms.Compose([ToTensor(), Normalize(ImageNet)])`` + unsqueeze: (1, 3, H, W)."""
    array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def seed_resize_content(img: Image.Image, max_size: int) -> Image.Image:
    """The tutorial's ``load_image(max_size=...)``: scale by the longest side, truncate to int."""
    scale = max_size / max(img.size)
    size = np.array(img.size) * scale
    return img.resize(tuple(size.astype(int)), Image.Resampling.LANCZOS)


def seed_resize_style(img: Image.Image, content_hw: tuple[int, int], *, transposed: bool) -> Image.Image:
    """The tutorial's ``load_image(shape=[content.size(2), content.size(3)])``.

    PIL's resize takes (width, height); the tutorial passes (H, W). ``transposed=True`` keeps that
    defect; ``False`` resizes to the content's real shape.
    """
    height, width = content_hw
    return img.resize((height, width) if transposed else (width, height), Image.Resampling.LANCZOS)


def seed_losses(
    target: Sequence[torch.Tensor], content: Sequence[torch.Tensor], style: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(content_loss, style_loss) exactly as the tutorial sums them over the five layers."""
    content_loss = torch.zeros((), device=target[0].device)
    style_loss = torch.zeros((), device=target[0].device)
    for f1, f2, f3 in zip(target, content, style):
        content_loss = content_loss + torch.mean((f1 - f2) ** 2)
        _, c, h, w = f1.size()
        g1 = torch.mm(f1.view(c, h * w), f1.view(c, h * w).t())  # (c, c), un-normalised
        f3 = f3.view(c, h * w)  # a transposed style map (w, h) has the same count
        g3 = torch.mm(f3, f3.t())
        style_loss = style_loss + torch.mean((g1 - g3) ** 2) / (c * h * w)
    return content_loss, style_loss


class SeedLoop:
    """The tutorial's ``main()`` as an object, so a benchmark can step it and read its image.

    ``shortcut=True`` computes the SAME trajectory more cheaply, for finding the seed's loss
    after many steps on a slow machine: content and style features once, VGG frozen and run only
    to module 29 (relu5_1, which overwrites conv5_1's output in place). The gradient with respect
    to the image is unchanged (the weight gradients and the constant targets never enter it), so
    only float rounding differs; tests/test_bench.py checks the two agree. It is never timed as
    "the seed loop".
    """

    def __init__(
        self,
        content_img: Image.Image,
        style_img: Image.Image,
        state_dict: Mapping[str, torch.Tensor],
        *,
        max_size: int = SEED_MAX_SIZE,
        device: torch.device | str = "cpu",
        transposed_style: bool = True,
        shortcut: bool = False,
        network: Network = VGG19,
    ) -> None:
        self.device = torch.device(device)
        self.shortcut = shortcut
        content_small = seed_resize_content(content_img, max_size)
        self.content = to_normalized(content_small).to(self.device)  # (1, 3, H, W)
        hw = (self.content.size(2), self.content.size(3))
        self.style = to_normalized(seed_resize_style(style_img, hw, transposed=transposed_style)).to(
            self.device
        )
        self.target = self.content.clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.target], lr=SEED_LR, betas=SEED_BETAS)
        self.vgg = SeedVGG(state_dict, network).to(self.device).eval()
        self.steps_done = 0
        if shortcut:
            self.vgg.requires_grad_(False)
            self.vgg.vgg = self.vgg.vgg[: self.vgg.shortcut_modules]
            with torch.no_grad():
                self._content_features = [f.clone() for f in self.vgg(self.content)]
                self._style_features = [f.clone() for f in self.vgg(self.style)]

    def step(self) -> torch.Tensor:
        """One tutorial step: three VGG passes, losses, backward (weight grads too), Adam."""
        target_features = self.vgg(self.target)
        if self.shortcut:
            content_features, style_features = self._content_features, self._style_features
        else:
            content_features = self.vgg(self.content)
            style_features = self.vgg(self.style)
        content_loss, style_loss = seed_losses(target_features, content_features, style_features)
        loss = content_loss + SEED_STYLE_WEIGHT * style_loss
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.steps_done += 1
        return loss.detach()

    def run(self, steps: int, callback: Callable[[int, "SeedLoop"], bool | None] | None = None,
            every: int = 10) -> None:
        """``steps`` steps; ``callback(step, self)`` every ``every`` steps; True from it stops."""
        for _ in range(steps):
            self.step()
            if callback is not None and self.steps_done % every == 0:
                if callback(self.steps_done, self):
                    return

    def image(self) -> torch.Tensor:
        """The image the tutorial would save: its own approximate denormalisation, clamped.

        (1, 3, H, W) RGB in [0, 1], detached.
        """
        mean = torch.tensor(SEED_DENORM_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(SEED_DENORM_STD, device=self.device).view(1, 3, 1, 1)
        return ((self.target.detach() - mean) / std).clamp(0, 1)


def seed_objective(
    image: torch.Tensor, content: torch.Tensor, style: torch.Tensor, model: SeedVGG
) -> float:
    """The seed's loss (content + 100 * style, its layers and Gram) of any image: lower is better.

    ``image``, ``content``, ``style``: (1, 3, H, W) RGB in [0, 1] on ``model``'s device; ``style``
    is normally the style image resized to the content's shape. This is the one loss definition
    every benchmark uses to compare outputs of the seed loop and of the engine's presets.
    """
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = [model((x.float() - mean) / std) for x in (image, content, style)]
        content_loss, style_loss = seed_losses(*feats)
    return float(content_loss + SEED_STYLE_WEIGHT * style_loss)


def pil_to_unit(img: Image.Image, device: torch.device | str = "cpu") -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) float in [0, 1]."""
    array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).to(device)


def quantize(image: torch.Tensor) -> torch.Tensor:
    """Round a [0, 1] image to 8 bits, as the file a user gets; keeps evaluation even-handed."""
    return torch.round(image.clamp(0, 1) * 255.0) / 255.0
