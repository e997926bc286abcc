"""The single-device oracle: Hugging Face ``transformers`` + ``peft`` on one process, float32.

``reference_run`` builds a tiny HF model, wraps it with ``peft.get_peft_model``, and records what
a sharded run must reproduce: the initial adapter (PEFT keys), logits, loss, every adapter
gradient, and the adapter after a few AdamW steps.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from dist_lora.testing.tiny import TINY_CONFIGS, hf_model


def peft_key(param_name: str) -> str:
    """``get_peft_model_state_dict`` key of a PEFT parameter name (adapter ``default``)."""
    name = param_name.replace(".modules_to_save.default.", ".")
    name = name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
    return re.sub(r"\.default(?=\.|$)", "", name)


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {peft_key(n): p for n, p in model.named_parameters() if p.requires_grad}


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def peft_model(family: str, config: dict, state: dict | None = None, base=None):
    """PEFT model on the tiny ``family`` base (seed 0) or on ``base``; ``state`` replaces the adapter."""
    import peft

    base = hf_model(TINY_CONFIGS[family]) if base is None else base
    model = peft.get_peft_model(base, peft.LoraConfig(**config))
    if state is not None:
        result = peft.set_peft_model_state_dict(model, state)
        if result.unexpected_keys:
            raise KeyError(f"unexpected keys {result.unexpected_keys}")
    return model


def reference_run(family: str, config: dict, ids: torch.Tensor, labels: torch.Tensor, steps: int = 3,
                  lr: float = 1e-2, eps: float = 1e-8, state: dict | None = None, base=None) -> dict:
    """Logits, loss, gradients and the adapter after ``steps`` AdamW steps, from PEFT (on the
    tiny ``family`` model, or on the HF model ``base``)."""
    import peft

    model = peft_model(family, config, state, base)
    start = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    logits = model(ids).logits
    loss = loss_of(logits, labels)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in trainable(model).items()}
    params = trainable(model)
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.01, eps=eps)
    optimizer.step()  # step 1 uses the gradients above
    for _ in range(steps - 1):
        optimizer.zero_grad()
        loss_of(model(ids).logits, labels).backward()
        optimizer.step()
    final = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    return {"state": start, "logits": logits.detach(), "loss": loss.detach(), "grads": grads, "final": final}


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| (0 when both are zero)."""
    scale = ref.abs().max().item()
    diff = (ours.float() - ref.float()).abs().max().item()
    return diff / scale if scale > 0 else diff
