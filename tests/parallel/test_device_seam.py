"""The device seam, statically: every torch factory call in the package names its device, and
the dynamic checker flags a planted violation (its distributed use is in
``test_device_seam_distributed.py``)."""

from __future__ import annotations

import ast

import torch

from dist_lora.testing.device_seam import (
    PACKAGE,
    ExplicitDeviceMode,
    implicit_device_calls,
    package_implicit_device_calls,
)

# Modules that name the host on purpose (see dist_lora.parallel.device), with the reason. A
# "cpu" anywhere else needs a reason added here.
HOST_ON_PURPOSE = {
    "dist_lora/adalora/allocator.py": "rank scores are pickled to the other stages as host copies",
    "dist_lora/adalora/apply.py": "initial triplets from a CPU generator (identical on every device), then moved",
    "dist_lora/adapters/journal.py": "rollback copies of rewritten base shards live in host memory",
    "dist_lora/checkpoint/sharded.py": "checkpoint slices are read into host memory, then copied to the model",
    "dist_lora/checkpoint/stream_writer.py": "tensors are written to files from host memory",
    "dist_lora/checkpoint/training_state.py": "the 'cpu' key of the saved RNG states",
    "dist_lora/cli.py": "the CLI's sample ids (models.logits moves them)",
    "dist_lora/combine/task_arithmetic.py": "DARE masks from a CPU generator, then moved",
    "dist_lora/eva/svd.py": "EVA's sketches from a CPU generator, then moved",
    "dist_lora/init/seeded.py": "initial factors from a CPU generator, then copied to the factors",
    "dist_lora/integrations/deepspeed.py": "DS_ACCELERATOR=cpu without CUDA",
    "dist_lora/integrations/megatron_cpu.py": "the CPU-only Megatron shim (a no-op with CUDA)",
    "dist_lora/parallel/agreement.py": "tensors are hashed from host copies (all_equal_tensors)",
    "dist_lora/parallel/device.py": "the CPU is the local device without CUDA",
    "dist_lora/parallel/linalg.py": "the randomised SVD's sketch from a CPU generator, then moved",
    "dist_lora/recipes/data/samples.py": "the training data stays in host memory; batches move to the model",
    "dist_lora/recipes/report.py": "peft verifies on the host",
}


def test_every_factory_call_in_the_package_names_its_device():
    assert package_implicit_device_calls() == []


def test_static_check_finds_an_implicit_device():
    source = "import torch\nx = torch.zeros(3)\ny = torch.zeros(3, device=x.device)\nz = torch.arange(4, **kw)\n" \
             "g = torch.Generator()\n"
    assert implicit_device_calls(source, "m.py") == ["m.py:2 torch.zeros", "m.py:5 torch.Generator"]


def _names_the_host(path) -> bool:
    """Whether a module spells out the CPU: a ``"cpu"`` literal or a ``.cpu()`` call."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and node.value == "cpu":
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cpu":
            return True
    return False


def test_host_memory_is_used_only_where_meant():
    users = {str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
             if _names_the_host(p) and (PACKAGE / "testing") not in p.parents}
    assert users == set(HOST_ON_PURPOSE)


def _planted(source: str, module_file: str):
    """``source`` compiled as if it were part of dist_lora's ``module_file`` (nothing is written)."""
    namespace = {"torch": torch}
    exec(compile(source, str(PACKAGE / module_file), "exec"), namespace)
    return namespace


def test_dynamic_check_flags_a_planted_violation_and_passes_derived_tensors():
    planted = _planted("def rows(x):\n    return x + torch.arange(x.shape[0])\n\n"
                       "def fine(x):\n    return x + torch.arange(x.shape[0], device=x.device) + x.new_zeros(1)\n",
                       "models/fused.py")
    with ExplicitDeviceMode() as mode:
        planted["fine"](torch.ones(3))
        torch.zeros(2)  # a test's own call is not dist_lora code
    assert mode.violations == [] and mode.calls == 1
    with ExplicitDeviceMode() as mode:
        planted["rows"](torch.ones(3))
    assert mode.violations == ["dist_lora/models/fused.py:2 rows -> torch.arange"]
