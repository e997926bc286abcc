"""Checks of the device seam: no tensor is created by dist_lora code on an implicit device.

The rule (:mod:`dist_lora.parallel.device`): a tensor that dist_lora creates either derives
from a tensor it meets (``x.new_zeros``, ``torch.zeros_like(x)``, ``x.to(...)``) or names its
device (``device=x.device``, ``device=collective_device(group)``, ``device="cpu"`` where host
memory is meant). On a CPU-only machine a missing ``device=`` cannot fail, so two checks make
it visible:

* :func:`implicit_device_calls`, static: every call of a torch factory function in the package
  source passes ``device=`` (all code, also paths no test runs);
* :class:`ExplicitDeviceMode`, dynamic: a ``TorchFunctionMode`` that records each factory call
  made *from dist_lora code* without a ``device`` argument while a real workload runs (calls
  through aliases or helpers included; Megatron's and torch's own calls are not ours).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

PACKAGE = Path(__file__).resolve().parents[1]
_TORCH = Path(torch.__file__).resolve().parent
_THIS = Path(__file__).resolve()

FACTORIES = ("arange", "as_tensor", "empty", "empty_strided", "eye", "full", "linspace", "logspace", "ones",
             "rand", "randint", "randn", "randperm", "scalar_tensor", "tensor", "zeros", "Generator")
_FACTORY_FUNCS = {getattr(torch, name) for name in FACTORIES if name != "Generator"}


def implicit_device_calls(source: str, filename: str = "<source>") -> list[str]:
    """``file:line torch.<factory>`` of each factory call in ``source`` without a ``device=``."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        func = node.func
        if func.attr in FACTORIES and isinstance(func.value, ast.Name) and func.value.id == "torch":
            if not any(k.arg == "device" or k.arg is None for k in node.keywords):  # **kwargs may carry it
                out.append(f"{filename}:{node.lineno} torch.{func.attr}")
    return out


def package_implicit_device_calls(package: Path = PACKAGE) -> list[str]:
    """:func:`implicit_device_calls` over every module of the package."""
    out = []
    for path in sorted(package.rglob("*.py")):
        out += implicit_device_calls(path.read_text(), str(path.relative_to(package.parent)))
    return out


def _ours(filename: str) -> bool:
    path = Path(filename).resolve()
    return PACKAGE in path.parents and (PACKAGE / "testing") not in path.parents


class ExplicitDeviceMode(TorchFunctionMode):
    """Records (``violations``: ``"file:line function -> torch.zeros"``) every torch factory call
    made from dist_lora code without a ``device`` argument while the mode is active."""

    def __init__(self):
        super().__init__()
        self.violations: list[str] = []
        self.calls = 0  # factory calls from dist_lora code that were checked

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORY_FUNCS:
            frame = sys._getframe(1)
            while frame is not None and (frame.f_code.co_name == "__torch_function__"
                                         or Path(frame.f_code.co_filename).resolve().is_relative_to(_TORCH)
                                         or Path(frame.f_code.co_filename).resolve() == _THIS):
                frame = frame.f_back
            if frame is not None and _ours(frame.f_code.co_filename):
                self.calls += 1
                if "device" not in kwargs:
                    where = Path(frame.f_code.co_filename).resolve().relative_to(PACKAGE.parent)
                    self.violations.append(f"{where}:{frame.f_lineno} {frame.f_code.co_name} -> "
                                           f"torch.{func.__name__}")
        return func(*args, **kwargs)
