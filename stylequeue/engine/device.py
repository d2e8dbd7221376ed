"""Device and precision choices.

``plan_execution`` is a pure function of (device type, precision) so its choices can be tested
without a GPU; ``resolve_device`` and ``apply_backend_settings`` touch the real backends.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch

from stylequeue.exceptions import ConfigError


@dataclass(frozen=True)
class ExecutionPlan:
    """How the forward pass runs. Losses, Gram matrices and the optimised image stay float32.

    fp16 runs without loss scaling, so tiny gradients can underflow: prefer bf16 (or fp32).
    """

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: no autocast
    channels_last: bool
    cudnn_benchmark: bool
    compile_mode: str | None = None  # torch.compile mode for the VGG forward; None: eager

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda, then mps, then cpu; a named device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"device {name!r} does not exist; this machine has {count} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} asked for, but MPS is not available; use 'auto' or 'cpu'")
    return device


def plan_execution(device: torch.device, precision: str = "auto", compile: str = "off") -> ExecutionPlan:
    """Pick autocast dtype, memory format and compilation. CPU and MPS stay float32 and eager.

    On CUDA, "auto" runs VGG's forward in bf16: it keeps fp32's exponent range, so no loss
    scaling is needed, and the losses themselves are computed in fp32. ``compile`` (a
    torch.compile mode, or "off") applies on CUDA only: it is a speed setting, measured by
    bench/gpu_bench.py; elsewhere compiling costs more than it saves.
    """
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    on_cuda = device.type == "cuda"
    if not on_cuda and precision in ("bf16", "fp16"):
        raise ConfigError(
            f"precision {precision} needs a CUDA device, but the device is {device.type}; "
            "use precision 'auto' or 'fp32'"
        )
    dtype = {"auto": torch.bfloat16 if on_cuda else None, "fp32": None,
             "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    mode = compile if on_cuda and compile != "off" else None
    return ExecutionPlan(device=device, autocast_dtype=dtype, channels_last=on_cuda, cudnn_benchmark=on_cuda,
                         compile_mode=mode)


def apply_backend_settings(plan: ExecutionPlan) -> None:
    """cuDNN autotuning: image sizes are fixed within a scale, so the search pays off."""
    if plan.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True


def autocast(plan: ExecutionPlan) -> ContextManager[object]:
    """Autocast context for the VGG forward; a no-op when the plan says fp32."""
    if plan.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=plan.device.type, dtype=plan.autocast_dtype)


# model -> {compile mode: compiled module}; weak, so a dropped model frees its compiled kernels.
_compiled: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Callable[..., Any]]]" = (
    weakref.WeakKeyDictionary()
)


def forward_of(model: torch.nn.Module, plan: ExecutionPlan) -> Callable[..., Any]:
    """The model itself, or its torch.compile'd forward when the plan asks (made once per model).

    Static shapes (``dynamic=False``): each scale and batch size compiles once and then reuses
    its kernels; "reduce-overhead" also records CUDA graphs of the forward and backward.
    """
    if plan.compile_mode is None:
        return model
    per_mode = _compiled.setdefault(model, {})
    if plan.compile_mode not in per_mode:
        per_mode[plan.compile_mode] = torch.compile(model, mode=plan.compile_mode, dynamic=False)
    return per_mode[plan.compile_mode]
