"""Single-device oracle for AdaLoRA: transformers + peft's AdaLoraModel and RankAllocator, float32.

``adalora_reference`` trains PEFT's AdaLoRA on a tiny model (the 2-layer Llama unless told) for
``steps`` steps (AdamW, PEFT's loop: backward, step, ``update_and_allocate(step)``, zero_grad) and
records, per step, the loss PEFT reports (cross-entropy + orthogonality penalty), the rank pattern and the adapter tensors.
"""

from __future__ import annotations

import torch

from dist_lora.testing.peft_reference import loss_of, trainable
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model

ADAM_EPS = 1e-6  # as in tests/layers/test_lora_distributed.py: keeps AdamW about the gradients


def peft_adalora(config: dict, state: dict | None = None, family: str = "llama"):
    import peft

    model = peft.get_peft_model(hf_model(TINY_CONFIGS[family]), peft.AdaLoraConfig(**config))
    if state is not None:
        params = trainable(model)
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)
    return model


def shifted(labels: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM loss pairs logits[t] with labels[t + 1]: the labels dist_lora expects."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


def strip_pattern(pattern: dict | None) -> dict | None:
    return None if pattern is None else {k.replace(".default", ""): list(map(bool, v)) for k, v in pattern.items()}


# task_type="CAUSAL_LM" matters: without it PeftModel.forward calls the HF model directly and
# skips AdaLoraModel.forward, so PEFT silently trains without the orthogonality penalty.
def adalora_reference(config: dict, ids: torch.Tensor, labels: torch.Tensor, steps: int, lr: float,
                      seed: int = 3, family: str = "llama") -> dict:
    model = peft_adalora(dict(config, task_type="CAUSAL_LM"), family=family)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # Lambda starts at zero in PEFT; random values make every score non-trivial
        for name, p in model.named_parameters():
            if ".lora_E." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    params = trainable(model)
    start = {k: v.detach().clone() for k, v in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.01, eps=ADAM_EPS)
    losses, ce, patterns, states, grads = [], [], [], [], None
    for step in range(steps):
        out = model(input_ids=ids, labels=labels)
        losses.append(out.loss.item())
        ce.append(loss_of(out.logits[:, :-1], labels[:, 1:]).item())
        out.loss.backward()
        if grads is None:
            grads = {k: p.grad.detach().clone() for k, p in params.items()}
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        patterns.append(strip_pattern(model.peft_config["default"].rank_pattern))
        states.append({k: v.detach().clone() for k, v in params.items()})
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return {"state": start, "losses": losses, "ce": ce, "patterns": patterns, "states": states, "grads": grads,
            "final_logits": logits}
