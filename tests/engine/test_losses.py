"""Losses against direct computations, and each loss falling under both optimisers."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from stylequeue.engine import ContentLoss, StyleConfig, StyleLoss, StyleTransferLoss, TVLoss, gram_matrix, preset, stylize
from stylequeue.engine.losses import WassersteinStyleLoss, moments
from stylequeue.engine.vgg import VGGFeatures


def _hand_gram(f: torch.Tensor) -> torch.Tensor:
    """Loop version of F F^T / (C H W) for one (C, H, W) item."""
    c, h, w = f.shape
    out = torch.zeros(c, c)
    for i in range(c):
        for j in range(c):
            out[i, j] = (f[i] * f[j]).sum()
    return out / (c * h * w)


def test_gram_matrix_matches_hand_computation() -> None:
    f = torch.randn(2, 4, 3, 5)
    g = gram_matrix(f)
    assert g.shape == (2, 4, 4)
    for b in range(2):
        torch.testing.assert_close(g[b], _hand_gram(f[b]))
    torch.testing.assert_close(gram_matrix(f, "sqrt_chw"), g * math.sqrt(4 * 3 * 5))


def test_content_loss_is_feature_mse_per_item() -> None:
    target, x = torch.randn(1, 4, 3, 5), torch.randn(2, 4, 3, 5)
    loss = ContentLoss(target)(x)
    assert loss.shape == (2,)
    for b in range(2):
        torch.testing.assert_close(loss[b], ((x[b] - target[0]) ** 2).sum() / x[b].numel())


def test_style_loss_blends_grams_and_is_gram_mse() -> None:
    s1, s2, x = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 5, 7), torch.randn(1, 4, 3, 5)
    loss = StyleLoss.from_grams([gram_matrix(s1), gram_matrix(s2)], [0.25, 0.75])
    expected_target = 0.25 * _hand_gram(s1[0]) + 0.75 * _hand_gram(s2[0])
    torch.testing.assert_close(loss.target[0], expected_target)
    torch.testing.assert_close(loss(x)[0], ((_hand_gram(x[0]) - expected_target) ** 2).mean())


def test_tv_loss_matches_hand_computation() -> None:
    x = torch.randn(1, 3, 4, 5)
    dx = sum((x[0, c, i, j + 1] - x[0, c, i, j]) ** 2 for c in range(3) for i in range(4) for j in range(4))
    dy = sum((x[0, c, i + 1, j] - x[0, c, i, j]) ** 2 for c in range(3) for i in range(3) for j in range(5))
    torch.testing.assert_close(TVLoss()(x)[0], dx / (3 * 4 * 4) + dy / (3 * 3 * 5))


def test_total_is_weighted_sum_of_weighted_layers() -> None:
    feats = {"a": torch.randn(1, 2, 3, 3), "b": torch.randn(1, 2, 3, 3)}
    image = torch.rand(1, 3, 4, 4)
    content_a, style_b = ContentLoss(torch.randn(1, 2, 3, 3)), StyleLoss(torch.randn(1, 2, 2))
    objective = StyleTransferLoss(
        {"a": (content_a, 2.0)}, {"b": (style_b, 3.0)}, content_weight=5.0, style_weight=7.0, tv_weight=11.0
    )
    terms = objective(feats, image)
    torch.testing.assert_close(terms.content, 5.0 * 2.0 * content_a(feats["a"]))
    torch.testing.assert_close(terms.style, 7.0 * 3.0 * style_b(feats["b"]))
    torch.testing.assert_close(terms.tv, 11.0 * TVLoss()(image))
    torch.testing.assert_close(terms.total, terms.content + terms.style + terms.tv)
    assert objective.layers == ["a", "b"]


# Shallow layers keep these runs cheap; the cut means nothing deeper is computed.
# The loss scaling is pinned here, not taken from the default preset, whose tuning may move.
FAST = dict(size=32, iterations=6, progress_every=1, content_layers=("relu2_1",),
            style_layers=("relu1_1", "relu2_1"), style_layer_weights=None, style_weight=1.0,
            gram_norm="chw")
TERMS = {
    "content": dict(style_weight=0.0, tv_weight=0.0, init="noise"),
    # Random weights make Gram entries tiny; L-BFGS's curvature test (y.s > 1e-10) needs a
    # loss of ordinary size, so scale the style term up.
    "style": dict(content_weight=0.0, tv_weight=0.0, style_weight=1e9),
    "tv": dict(content_weight=0.0, style_weight=0.0, tv_weight=1.0, init="noise"),
    "total": dict(tv_weight=1.0, init="noise"),
}


@pytest.mark.parametrize("optimizer,lr", [("adam", 0.01), ("lbfgs", 1.0)])
@pytest.mark.parametrize("term", list(TERMS))
def test_each_loss_decreases(
    term: str, optimizer: str, lr: float, model: VGGFeatures,
    content_image: Image.Image, style_image: Image.Image,
) -> None:
    cfg = preset("default", optimizer=optimizer, lr=lr, **{**FAST, **TERMS[term]})
    history = stylize(content_image, [style_image], cfg, model=model).history
    key = "loss" if term == "total" else f"{term}_loss"
    first, last = history[0][key], history[-1][key]
    assert first > 0 and last < 0.9 * first, (first, last)


def test_relative_losses_do_not_depend_on_the_features_scale() -> None:
    """What makes one preset mean the same on Caffe weights (activations ~28x larger) and
    torchvision's: each relative term is unchanged when all features are scaled."""
    gen = torch.Generator().manual_seed(0)
    target, x = torch.rand(1, 8, 6, 5, generator=gen), torch.rand(1, 8, 6, 5, generator=gen)
    for k in (0.01, 28.0, 1000.0):
        torch.testing.assert_close(ContentLoss(k * target, relative=True)(k * x),
                                   ContentLoss(target, relative=True)(x), rtol=1e-5, atol=0)
        torch.testing.assert_close(StyleLoss(gram_matrix(k * target), relative=True)(k * x),
                                   StyleLoss(gram_matrix(target), relative=True)(x), rtol=1e-4, atol=0)
        mean, srm = moments(k * target)
        ref_mean, ref_srm = moments(target)
        torch.testing.assert_close(WassersteinStyleLoss(mean, srm, relative=True)(k * x),
                                   WassersteinStyleLoss(ref_mean, ref_srm, relative=True)(x), rtol=1e-3, atol=1e-7)
    plain = ContentLoss(target)(x)
    assert float(ContentLoss(28 * target)(28 * x)) == pytest.approx(28**2 * float(plain), rel=1e-5)


def test_wasserstein_is_the_gaussian_w2_and_zero_at_the_target() -> None:
    gen = torch.Generator().manual_seed(1)
    style = torch.rand(1, 4, 9, 7, generator=gen) * 3
    loss = WassersteinStyleLoss(*moments(style))
    assert float(loss(style)) == pytest.approx(0.0, abs=1e-4)
    assert float(loss(torch.rand(1, 4, 9, 7, generator=gen))) > 0.1
    # Independent channels (diagonal covariances): W2^2 = mean_c [(mu - m)^2 + (s - t)^2].
    a = torch.zeros(1, 2, 1, 4)
    a[0, 0, 0] = torch.tensor([0.0, 2.0, 0.0, 2.0])  # mean 1, sd 1
    a[0, 1, 0] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # mean 1, sd 0
    b = torch.zeros(1, 2, 1, 4)
    b[0, 0, 0] = torch.tensor([1.0, 7.0, 1.0, 7.0])  # mean 4, sd 3
    b[0, 1, 0] = torch.tensor([0.0, 4.0, 0.0, 4.0])  # mean 2, sd 2
    expected = ((1 - 4) ** 2 + (1 - 3) ** 2 + (1 - 2) ** 2 + (0 - 2) ** 2) / 2
    assert float(WassersteinStyleLoss(*moments(b))(a)) == pytest.approx(expected, rel=2e-3)
    x = torch.rand(1, 4, 9, 7, generator=gen, requires_grad=True)
    loss(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_stacked_losses_are_the_items_own() -> None:
    gen = torch.Generator().manual_seed(2)
    targets = [torch.rand(1, 4, 5, 5, generator=gen) for _ in range(3)]
    xs = torch.rand(3, 4, 5, 5, generator=gen)
    for make in (lambda t: ContentLoss(t, relative=True), lambda t: StyleLoss(gram_matrix(t), relative=True),
                 lambda t: WassersteinStyleLoss(*moments(t), relative=True)):
        alone = [make(t) for t in targets]
        stacked = type(alone[0]).stacked(alone)(xs)
        torch.testing.assert_close(stacked, torch.cat([l(xs[i : i + 1]) for i, l in enumerate(alone)]))


def test_default_style_targets_do_not_depend_on_the_number_of_positions(model) -> None:
    """The default Gram normalisation is per position (``chw``): a texture's Gram at twice the
    size is the same, so a style target means the same for a tile, a smaller ``style_scale`` or a
    style of another aspect ratio. ``sqrt_chw`` (the seed's scale) grows with the square root."""
    torch.manual_seed(0)
    patch = torch.rand(1, 3, 16, 16)
    small, large = patch.repeat(1, 1, 4, 4), patch.repeat(1, 1, 8, 8)  # one periodic texture, 64 and 128 px
    with torch.no_grad():
        a, b = (model(x, ["relu1_1"])["relu1_1"][..., 8:-8, 8:-8] for x in (small, large))  # edges off
    norm = StyleConfig().gram_norm
    g_small, g_large = gram_matrix(a, norm), gram_matrix(b, norm)
    assert float((g_large - g_small).norm() / g_small.norm()) < 0.05
    seed_small, seed_large = gram_matrix(a, "sqrt_chw"), gram_matrix(b, "sqrt_chw")
    assert float((seed_large - seed_small).norm() / seed_small.norm()) > 0.5


def test_a_shifted_gram_target_keeps_the_unshifted_scale() -> None:
    """A tile's shift (engine/tiled.py) moves its target, not its weight: the relative scale is
    the style's own, whatever the shift."""
    torch.manual_seed(0)
    grams = [torch.rand(1, 4, 4) + 0.5, torch.rand(1, 4, 4) + 0.5]
    shift = 0.3 * torch.randn(1, 4, 4)
    plain = StyleLoss.from_grams(grams, [0.25, 0.75], relative=True)
    shifted = StyleLoss.from_grams(grams, [0.25, 0.75], relative=True, shift=shift)
    assert torch.allclose(shifted.target, plain.target + shift)
    assert torch.equal(shifted.scale, plain.scale)


def test_weighted_losses_are_the_weighted_sums_by_hand() -> None:
    """A tile's terms weigh each position (objective.TileShare): the weighted Gram matrix, moments
    and content MSE are sums over positions of weight x term over the weights' sum; weights of 1
    give the plain losses, and a position of weight 0 does not count at all."""
    torch.manual_seed(1)
    f, target = torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5)
    weight = torch.rand(1, 1, 4, 5)
    flat, w = f[0].reshape(3, 20), weight.reshape(20)
    expected = sum(w[p] * torch.outer(flat[:, p], flat[:, p]) for p in range(20)) / (3 * w.sum())
    torch.testing.assert_close(gram_matrix(f, "chw", weight)[0], expected)
    torch.testing.assert_close(gram_matrix(f, "chw", torch.ones(1, 1, 4, 5)), gram_matrix(f))
    mean, srm = moments(f, weight)
    torch.testing.assert_close(mean[0], (flat * w).sum(1) / w.sum())
    torch.testing.assert_close(srm[0], 3 * expected)  # a second moment is not divided by C
    loss = ContentLoss(target)(f, weight)[0]
    torch.testing.assert_close(loss, ((f - target).pow(2) * weight).sum() / (3 * weight.sum()))
    cut = weight.clone()
    cut[..., 2:, :] = 0  # only the top half counts: the bottom may be anything
    other = f.clone()
    other[..., 2:, :] += 5
    torch.testing.assert_close(gram_matrix(other, "chw", cut), gram_matrix(f, "chw", cut))
    with pytest.raises(ValueError, match="per position"):
        gram_matrix(f, "sqrt_chw", weight)


def test_a_content_term_may_be_relative_to_another_mean_square() -> None:
    """A tile's content term divides by its whole picture's mean square (tiled.PictureStats)."""
    target, x = torch.randn(1, 4, 3, 5), torch.randn(1, 4, 3, 5)
    mse = ContentLoss(target)(x)
    torch.testing.assert_close(ContentLoss(target, relative=True)(x), mse / target.pow(2).mean())
    torch.testing.assert_close(ContentLoss(target, relative=True, mean_square=2.0)(x), mse / 2.0)
    assert ContentLoss(target, mean_square=2.0).scale is None  # absolute losses take no scale
