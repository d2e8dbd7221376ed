"""Device and precision choices, as pure functions (the GPU paths cannot run here)."""

from __future__ import annotations

import pytest
import torch

from stylequeue.engine.device import autocast, plan_execution, resolve_device
from stylequeue.exceptions import ConfigError


def test_cuda_plan_uses_bf16_channels_last_and_cudnn_autotune() -> None:
    plan = plan_execution(torch.device("cuda"), "auto")
    assert (plan.autocast_dtype, plan.channels_last, plan.cudnn_benchmark) == (torch.bfloat16, True, True)
    assert plan.precision == "bf16"
    assert plan_execution(torch.device("cuda:1"), "fp32").autocast_dtype is None
    assert plan_execution(torch.device("cuda"), "fp16").precision == "fp16"


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_cpu_and_mps_stay_float32(device: str) -> None:
    plan = plan_execution(torch.device(device), "auto")
    assert (plan.autocast_dtype, plan.channels_last, plan.cudnn_benchmark, plan.precision) == (
        None, False, False, "fp32")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        plan_execution(torch.device(device), "bf16")


def test_resolve_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_fp32_autocast_is_a_no_op() -> None:
    with autocast(plan_execution(torch.device("cpu"), "fp32")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
