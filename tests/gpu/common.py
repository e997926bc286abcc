"""What the GPU tests share: where they run, and PEFT's reference computed on that device.

They need a CUDA GPU (``pytest -m gpu``; skipped without one). ``DIST_LORA_GPU_TESTS_ON_CPU=1``
runs the same checks on the CPU (gloo) to prove the test code itself before a GPU session;
``benchmarks/gpu_check.sh`` runs them on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from dist_lora.integrations.bitsandbytes import available as bnb_available
from dist_lora.integrations.bitsandbytes import quantize_4bit
from dist_lora.testing.peft_reference import loss_of, peft_key
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model

ON_CPU = os.environ.get("DIST_LORA_GPU_TESTS_ON_CPU") == "1"
RUN = torch.cuda.is_available() or ON_CPU
DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
MARKS = [pytest.mark.gpu, pytest.mark.skipif(not RUN, reason="needs a CUDA GPU (or DIST_LORA_GPU_TESTS_ON_CPU=1)")]

BATCH, SEQ, STEPS, LR, ADAM_EPS, QBLOCK = 2, 16, 3, 1e-2, 1e-6, 32
SCENARIOS = {
    "lora": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"])),
    "qlora": ("mistral", dict(r=4, lora_alpha=8, target_modules="all-linear")),
}


def batch(family: str):
    g = torch.Generator().manual_seed(7)
    vocab = TINY_CONFIGS[family]["vocab_size"]
    return torch.randint(0, vocab, (BATCH, SEQ), generator=g), torch.randint(0, vocab, (BATCH, SEQ), generator=g)


def base_model(family: str, dtype: torch.dtype, quantised: bool):
    """The tiny HF model on DEVICE in ``dtype``; QLoRA: linear weights (not lm_head) replaced by
    dequant(nf4(W)) of the ``dtype`` weights, quantised on DEVICE (as dist_lora's 4-bit layers)."""
    model = hf_model(TINY_CONFIGS[family]).to(device=DEVICE, dtype=dtype)
    if quantised:
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and name != "lm_head":
                    module.weight.copy_(quantize_4bit(module.weight, "nf4", QBLOCK).dequantize())
    return model


def reference(family: str, config: dict, dtype: torch.dtype, state: dict | None = None, quantised: bool = False,
              steps: int = STEPS) -> dict:
    """PEFT on DEVICE: initial adapter, logits, loss, gradients, adapter after ``steps`` AdamW steps
    (everything returned on the CPU)."""
    import peft

    ids, labels = (t.to(DEVICE) for t in batch(family))
    model = peft.get_peft_model(base_model(family, dtype, quantised), peft.LoraConfig(**config))
    if state is not None:
        peft.set_peft_model_state_dict(model, {k: v.to(DEVICE) for k, v in state.items()})
    start = {k: v.detach().cpu().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    logits = model(ids).logits
    loss = loss_of(logits, labels)
    loss.backward()
    params = {peft_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    grads = {k: p.grad.detach().float().cpu().clone() for k, p in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=LR, weight_decay=0.01, eps=ADAM_EPS)
    optimizer.step()
    for _ in range(steps - 1):
        optimizer.zero_grad()
        loss_of(model(ids).logits, labels).backward()
        optimizer.step()
    final = {k: v.detach().float().cpu().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    return {"state": start, "logits": logits.detach().float().cpu(), "loss": loss.detach().float().cpu(),
            "grads": grads, "final": final}


def qlora_available() -> bool:
    return bnb_available()
