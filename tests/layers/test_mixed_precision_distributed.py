"""bfloat16 bases with float32 adapters, sharded, against PEFT in bfloat16 on one process.

Mixed precision cannot be compared to a fixed tolerance: a bfloat16 forward differs from the
float32 one by bfloat16's rounding, and so does PEFT's. So the parent measures PEFT's own error,
``floor = err(PEFT bf16, PEFT fp32)``, for the logits and the adapter gradients, and each
worker (dist_lora, bfloat16 base, float32 adapters, at TP2, TP2 + SP and PP2) must be within
``K x floor`` of the float32 truth and within ``(K + 1) x floor`` of PEFT bf16. ``K = 2``: the
Megatron model rounds in other places than Hugging Face's (RMSNorm, RoPE, attention), and the
measured ratios ours / floor were 0.67 to 1.27 (logits and gradients, all scenarios and layouts).
Other dropout masks move the gradients by ~47x the floor (measured), so the masks really agree;
the adapters must be float32 (PEFT's autocast) and the bf16 DoRA-with-dropout path must run at all.

Scenarios: LoRA on every linear layer, rsLoRA with rank / alpha patterns, DoRA with dropout, and
QLoRA (nf4 base computing in bfloat16, PEFT on the same dequantised weights). Dropout masks are
the same on both sides: each adapted module's dropout is replaced by a fixed mask of the global
input [batch, seq, in] drawn by the parent; a rank applies its part (sequence shard under SP,
feature shard on row-parallel layers).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dist_lora import LoraConfig, adapter_state_dict, apply_lora, models, quantize_base, set_adapter_state_dict
from dist_lora.adapters.registry import adapter_layers
from dist_lora.integrations.bitsandbytes import quantize_4bit
from dist_lora.models.training import finalize_grads, forward_backward
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.peft_reference import loss_of, peft_key, rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model, save_tiny

K = 2.0  # ours / floor measured 0.67-1.27; the failure message reports the ratio
BATCH, SEQ, P_DROP, QBLOCK = 2, 8, 0.25, 32
SCENARIOS = {
    "lora_all_linear": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "rslora_patterns": ("llama", dict(r=4, lora_alpha=8, use_rslora=True,
                                      target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                                      rank_pattern={"model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
                                      alpha_pattern={"v_proj": 3})),
    "dora_dropout": ("llama", dict(r=4, lora_alpha=8, use_dora=True, lora_dropout=P_DROP,
                                   target_modules=["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"])),
    "qlora": ("mistral", dict(r=4, lora_alpha=8, target_modules="all-linear")),
}


class FixedMask(nn.Module):
    """Inverted dropout with a given keep-mask of the *global* input [b, s, in] (train mode only).

    A Megatron layer's input is [s, b, in] or a shard of it: [s/p, b, in] (SP) or [s, b, in/p]
    (row-parallel); the part of the mask that matches is cut out."""

    def __init__(self, keep: torch.Tensor, p: float, tp: int = 1, rank: int = 0, megatron: bool = False):
        super().__init__()
        self.keep, self.p, self.tp, self.rank, self.megatron = keep, p, tp, rank, megatron

    def forward(self, x):
        if not self.training:
            return x
        keep = self.keep.transpose(0, 1) if self.megatron else self.keep
        if keep.shape[0] != x.shape[0]:
            keep = keep.chunk(self.tp, dim=0)[self.rank]
        if keep.shape[-1] != x.shape[-1]:
            keep = keep.chunk(self.tp, dim=-1)[self.rank]
        return x * keep.to(device=x.device, dtype=x.dtype) / (1 - self.p)


def _base(family: str, dtype: torch.dtype, quantised: bool):
    """The tiny HF model in ``dtype``; for QLoRA every decoder linear weight replaced by
    dequant(nf4(W_bf16)) (the values our bf16 model's 4-bit layers compute with), in ``dtype``."""
    base = hf_model(TINY_CONFIGS[family]).to(torch.bfloat16 if quantised else dtype)
    if quantised:
        with torch.no_grad():
            for name, module in base.named_modules():
                if isinstance(module, nn.Linear) and name != "lm_head":
                    module.weight.copy_(quantize_4bit(module.weight, "nf4", QBLOCK).dequantize())
        base = base.to(dtype)
    return base.eval()


def _peft(family, config, dtype, state, masks, quantised):
    """PEFT's logits (eval), loss and adapter gradients (train, fixed dropout masks) in ``dtype``."""
    import peft

    model = peft.get_peft_model(_base(family, dtype, quantised), peft.LoraConfig(**config))
    if state is not None:
        peft.set_peft_model_state_dict(model, state)
    for name, module in model.named_modules():
        if name.endswith(".lora_dropout"):
            hf = name.removeprefix("base_model.model.").removesuffix(".lora_dropout")
            module["default"] = FixedMask(masks[hf], P_DROP) if hf in masks else nn.Identity()
    state = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    return model, state


def reference(family, config, ids, labels, dtype, state, masks, quantised) -> dict:
    model, state = _peft(family, config, dtype, state, masks, quantised)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # autocast adapters
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits.float()
    model.train()
    loss = loss_of(model(ids).logits, labels)
    loss.backward()
    grads = {peft_key(n): p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"state": state, "logits": logits, "loss": loss.detach().float(), "grads": grads}


def _masks(family: str, config: dict) -> dict:
    """A keep-mask [b, s, in] per adapted module (DoRA-with-dropout scenario only)."""
    if not config.get("lora_dropout"):
        return {}
    base, g, out = hf_model(TINY_CONFIGS[family]), torch.Generator().manual_seed(17), {}
    for name, module in base.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in config["target_modules"]:
            out[name] = torch.rand(BATCH, SEQ, module.in_features, generator=g) >= P_DROP
    return out


def prepare(tmp: Path) -> dict:
    data = {}
    for family in ("llama", "mistral"):
        save_tiny(TINY_CONFIGS[family], tmp / family)
        data[family] = str(tmp / family)
    for name, (family, config) in SCENARIOS.items():
        config = dict(config, init_lora_weights=False)  # random A and B
        vocab = TINY_CONFIGS[family]["vocab_size"]
        g = torch.Generator().manual_seed(3)
        ids, labels = torch.randint(0, vocab, (BATCH, SEQ), generator=g), torch.randint(0, vocab, (BATCH, SEQ), generator=g)
        masks, quantised = _masks(family, config), name == "qlora"
        fp32 = reference(family, config, ids, labels, torch.float32, None, masks, quantised)
        bf16 = reference(family, config, ids, labels, torch.bfloat16, fp32["state"], masks, quantised)
        torch.save({"ids": ids, "labels": labels, "masks": masks, "fp32": fp32, "bf16": bf16}, tmp / f"mp_{name}.pt")
    return data


def _worst(ours: dict, ref: dict) -> float:
    assert sorted(ours) == sorted(ref), sorted(set(ours) ^ set(ref))
    return max(rel_error(ours[k], ref[k]) for k in ref)


def _within_floor(what: str, ours, fp32, bf16, measure) -> str:
    floor, truth, theirs = measure(bf16, fp32), measure(ours, fp32), measure(ours, bf16)
    note = f"{what}: floor {floor:.2e}, ours-vs-fp32 {truth:.2e} ({truth / floor:.2f}x), ours-vs-peft-bf16 {theirs:.2e}"
    assert floor > 1e-4, f"{note}: PEFT's bf16 run is not bf16"
    assert truth <= K * floor and theirs <= (K + 1) * floor, note
    return note


@check("tp2", "tp2-sp", "pp2")
def bf16_base_with_fp32_adapters_is_within_peft_bf16_error(ctx):
    notes = []
    g = ctx.groups
    for name, (family, config) in SCENARIOS.items():
        ref = torch.load(Path(ctx.tmp) / f"mp_{name}.pt")
        fp32, bf16 = ref["fp32"], ref["bf16"]
        model = models.from_pretrained(ctx.data[family], dtype=torch.bfloat16)
        apply_lora(model, LoraConfig(**dict(config, init_lora_weights=False)))
        set_adapter_state_dict(model, fp32["state"])
        if name == "qlora":
            quantize_base(model, "nf4", blocksize=QBLOCK)
        for _, layer in adapter_layers(model):
            for factors in layer.factors_of("default").values():
                assert factors.lora_A.dtype == torch.float32, "adapters default to float32 on a bf16 base"
                mask = ref["masks"].get(factors.slot.hf_names[0])
                if mask is not None:
                    factors.dropout = FixedMask(mask, P_DROP, g.tp_size, g.tp_rank, megatron=True)
        logits = models.logits(model, ref["ids"])
        notes.append(_within_floor(f"{name} logits", logits, fp32["logits"], bf16["logits"], rel_error))
        forward_backward(model, ref["ids"], ref["labels"], num_microbatches=1)
        finalize_grads(model)
        grads = adapter_state_dict(model, gradients=True)
        notes.append(_within_floor(f"{name} gradients", grads, fp32["grads"], bf16["grads"], _worst))
    if g.rank == 0:
        print("\n".join(notes), flush=True)


test_mixed_precision_distributed = distributed_tests(__name__, world_size=2, prepare=prepare)
