"""A writer killed with SIGKILL at any point of ``save_adapter`` leaves the previous checkpoint
complete, loadable and verified (single process, plain torch.nn path)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest
import torch

import dist_lora as dl
from dist_lora.adapters.registry import adapter_layers
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model

CONFIG = dict(r=32, lora_alpha=8, target_modules="all-linear")


def _model():
    model = hf_model(TINY_CONFIGS["llama"])
    dl.apply_lora(model, dl.LoraConfig(**CONFIG))
    return model


def _fill(model, value: float) -> None:
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for factors in layer.factors_of("default").values():
                factors.lora_A.fill_(value)
                factors.lora_B.fill_(value)


def _save_forever(path: str, ready) -> None:
    model = _model()
    version = 1
    while True:
        version += 1
        _fill(model, float(version))
        dl.save_adapter(model, path, overwrite=True)
        ready.set()


@pytest.mark.parametrize("delay", [0.0, 0.003, 0.011, 0.027, 0.05, 0.093])
def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path, delay):
    path = tmp_path / "ckpt"
    first = _model()
    _fill(first, 1.0)
    dl.save_adapter(first, path)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    writer = ctx.Process(target=_save_forever, args=(str(path), ready))
    writer.start()
    assert ready.wait(60), "the writer never finished a save"
    time.sleep(delay)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    fresh = _model()
    dl.load_adapter(fresh, path)  # verifies every shard's sha256
    values = {t.unique().item() for k, t in dl.adapter_state_dict(fresh).items() if "lora_" in k}
    assert len(values) == 1 and values.pop() >= 1.0, "a checkpoint mixes two saves"
    # What may remain beside it: an abandoned temp dir, or an old one whose deletion was cut short.
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt"]
    assert all(".ckpt.tmp-" in name or ".ckpt.old-" in name for name in leftovers), leftovers
    dl.save_adapter(fresh, path, overwrite=True)  # the next save clears the remains of old ones
    assert not [p for p in tmp_path.iterdir() if ".ckpt.old-" in p.name]


def _export_forever(path: str, ready) -> None:
    model = _model()
    version = 1
    while True:
        version += 1
        _fill(model, float(version))
        dl.export_peft(model, path, base_model_name_or_path=f"v{version}", overwrite=True)
        ready.set()


@pytest.mark.parametrize("delay", [0.0, 0.007, 0.019, 0.043])
def test_sigkill_during_default_export_keeps_a_matching_pair_and_the_siblings(tmp_path, delay):
    """The default adapter's two files beside another adapter's sub-folder are replaced as a pair:
    after SIGKILL at any point, PEFT's reader finds files of one export, and the sibling is intact."""
    from dist_lora.checkpoint.peft_format import read_peft

    path = tmp_path / "peft"
    first = _model()
    _fill(first, 1.0)
    dl.export_peft(first, path, base_model_name_or_path="v1")
    dl.add_adapter(first, dl.LoraConfig(r=2, target_modules=["q_proj"]), "other")
    dl.export_peft(first, path, adapter_name="other")
    sibling = {p.name: p.read_bytes() for p in (path / "other").iterdir()}
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    writer = ctx.Process(target=_export_forever, args=(str(path), ready))
    writer.start()
    assert ready.wait(60), "the writer never finished an export"
    time.sleep(delay)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    config, tensors = read_peft(path)  # rolls back an interrupted replacement first
    values = {t.unique().item() for k, t in tensors.items() if "lora_" in k}
    assert len(values) == 1 and config.base_model_name_or_path == f"v{int(values.pop())}", "files of two exports"
    assert {p.name: p.read_bytes() for p in (path / "other").iterdir()} == sibling
    leftovers = [p.name for p in path.iterdir() if p.name not in ("adapter_model.safetensors", "adapter_config.json",
                                                                    "other")]
    assert all(name.startswith(".adapter.tmp-") for name in leftovers), leftovers
