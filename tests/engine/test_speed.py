"""Speed settings that must not change results: torch.compile, and no syncs in the inner loop."""

from __future__ import annotations

import ast
import importlib
import inspect

import pytest
import torch

from stylequeue.engine import preset, stylize
from stylequeue.engine.device import ExecutionPlan, forward_of, plan_execution
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.exceptions import ConfigError

stylize_module = importlib.import_module("stylequeue.engine.transfer")  # the package exports stylize()
# Functions that run every iteration. _report (progress points) is where losses come to the host.
INNER_LOOP = [
    stylize_module._run_scale, stylize_module._after_step, stylize_module._evaluate,
    stylize_module._step, stylize_module._stopped,
]
SYNCING = {"item", "tolist", "cpu", "numpy", "float", "int", "bool", "nonzero", "any", "all"}


def test_compile_applies_on_cuda_only() -> None:
    assert plan_execution(torch.device("cuda"), "auto", "reduce-overhead").compile_mode == "reduce-overhead"
    assert plan_execution(torch.device("cuda"), "auto").compile_mode is None
    assert plan_execution(torch.device("cpu"), "auto", "default").compile_mode is None
    with pytest.raises(ConfigError, match="compile must be one of"):
        preset("default", compile="fast")
    assert preset("default", compile="default").compile == "default"


def test_inner_loop_has_no_host_device_sync() -> None:
    """No .item(), float(tensor), bool(tensor), .cpu() ... in code that runs every iteration.

    A static check (CUDA's sync debug mode needs a GPU): it reads the functions' source.
    L-BFGS's own step syncs (torch's implementation calls .item()); that cannot be avoided.
    """
    found = []
    for fn in INNER_LOOP:
        tree = ast.parse(inspect.getsource(fn).lstrip())  # methods' sources are indented
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in SYNCING:
                    found.append(f"{fn.__qualname__}: {ast.unparse(node)}")
            if isinstance(node, (ast.If, ast.While)) and "Tensor" in ast.unparse(node.test):
                found.append(f"{fn.__qualname__}: branch on a tensor {ast.unparse(node.test)}")
    assert found == []


def test_compiled_forward_matches_eager(model: VGGFeatures) -> None:
    """Inductor on the CPU here (the same graph CUDA compiles): features and gradients agree.

    Slow (~25 s of compilation on two cores); the GPU bench measures whether it pays on CUDA.
    """
    plan = ExecutionPlan(torch.device("cpu"), None, channels_last=False, cudnn_benchmark=False,
                         compile_mode="default")
    layers = ["relu1_1", "relu2_1"]
    image = torch.rand(2, 3, 21, 32, generator=torch.Generator().manual_seed(0))
    grads = []
    for forward in (forward_of(model, plan), model):
        x = image.clone().requires_grad_(True)
        features = forward(x, layers, normalized=False)
        sum(f.pow(2).mean() for f in features.values()).backward()
        grads.append((features, x.grad))
    (compiled, compiled_grad), (eager, eager_grad) = grads
    for name in layers:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-8)
    assert forward_of(model, plan) is forward_of(model, plan)  # compiled once per model


def test_compile_setting_is_ignored_on_cpu_and_free_for_resume(model: VGGFeatures, content_image,
                                                                style_image) -> None:
    fast = dict(size=32, iterations=2, content_layers=("relu2_1",), style_layers=("relu1_1",),
                style_layer_weights=None)
    plain = stylize(content_image, [style_image], preset("default", **fast), model=model)
    compiled = preset("default", **fast, compile="reduce-overhead")
    same = stylize(content_image, [style_image], compiled, model=model)
    assert torch.equal(plain.state.image, same.state.image)
    resumed = stylize(content_image, [style_image], compiled.replace(iterations=2), model=model,
                      resume=plain.state)
    assert resumed.state.iteration == 2
