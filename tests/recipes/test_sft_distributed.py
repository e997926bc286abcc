"""Loss masks of chat / completion data against transformers + peft, on TP=2, PP=2 and DP=2
(one 2-rank launch), and the token cache read by two data-parallel ranks.

For each scenario (chat or completion data, padded or packed samples) the parent builds the
step-0 global batch independently of dist_lora's data code (ChatML assembled turn by turn;
packing recomputed next-fit), and runs peft on the unsharded tiny Llama on every document
separately: loss = the sum of token losses over every counted label / their number, labels -100
on masked tokens, and each adapter gradient. Each worker runs what the recipe runs for its
first step: ``recipe_data`` (the token cache, built once by rank 0), Megatron-Core DDP,
``forward_backward`` over several micro-batches whose numbers of counted tokens differ (the
parent asserts that the mean of micro-batch means would be wrong), ``finalize_grads``.
"""

from __future__ import annotations

from pathlib import Path

import peft
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dist_lora import LoraConfig, adapter_state_dict, apply_lora, models, set_adapter_state_dict
from dist_lora.models.training import finalize_grads, forward_backward, use_megatron_ddp
from dist_lora.parallel.collectives import all_gather_object
from dist_lora.recipes.config import load_config
from dist_lora.recipes.data import recipe_data
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.peft_reference import peft_model, rel_error, trainable
from tests.recipes.sft_fixtures import (
    chat_records,
    completion_records,
    make_base,
    reference_document,
    shifted,
    write_jsonl,
    write_recipe,
)

LORA = dict(r=4, lora_alpha=8, target_modules="all-linear")
GLOBAL_BATCH, MICRO = 8, 2  # samples per step (all DP ranks), rows per micro-batch
TOL = 1e-5
SCENARIOS = {  # name: (format, packing, seq_len)
    "chat_padded": ("chat", False, 96),
    "chat_packed": ("chat", True, 160),
    "completion_padded": ("completion", False, 48),
    "completion_packed": ("completion", True, 64),
}


def _records(fmt: str) -> list[dict]:
    base = chat_records() if fmt == "chat" else completion_records()
    return base * 3  # 30 documents: enough for a step of 8 packed samples


def _step_documents(lengths: list[int], packing: bool, seq_len: int) -> tuple[list[int], list[int]]:
    """Documents of the step-0 global batch, and the sample (row) of each."""
    if not packing:
        return list(range(GLOBAL_BATCH)), list(range(GLOBAL_BATCH))
    docs, rows, row, used = [], [], 0, 0
    for doc, length in enumerate(lengths):
        if used + length - 1 > seq_len:
            row, used = row + 1, 0
        if row == GLOBAL_BATCH:
            break
        docs.append(doc)
        rows.append(row)
        used += length - 1
    return docs, rows


def prepare(tmp: Path) -> dict:
    base = make_base(tmp / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    hf = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager", dtype=torch.float32)
    model = peft_model("llama", dict(LORA, init_lora_weights=False), base=hf)
    state = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    data = {"base": str(base)}
    for name, (fmt, packing, seq_len) in SCENARIOS.items():
        records = _records(fmt)
        path = write_jsonl(tmp / f"{name}.jsonl", records)
        evaluation = write_jsonl(tmp / f"{name}_eval.jsonl", records[:3])
        data[name] = str(write_recipe(tmp / f"{name}.yaml", base, path, fmt, evaluation,
                                      **{"data.seq_len": seq_len, "data.packing": packing,
                                         "train.micro_batch_size": MICRO}))
        documents = [reference_document(tokenizer, r, fmt) for r in records]
        docs, rows = _step_documents([len(t) for t, _ in documents], packing, seq_len)
        model.zero_grad()
        total, count = torch.zeros(()), 0
        per_row = {}
        for doc, row in zip(docs, rows):
            ids, labels = shifted(*documents[doc])
            logits = model(ids.unsqueeze(0)).logits[0]
            summed = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
            total, count = total + summed, count + int((labels != -100).sum())
            s, n = per_row.get(row, (0.0, 0))
            per_row[row] = (s + summed.item(), n + int((labels != -100).sum()))
        loss = total / count
        loss.backward()
        micro = [[per_row[r] for r in range(k, k + MICRO)] for k in range(0, GLOBAL_BATCH, MICRO)]
        counts = [sum(n for _, n in m) for m in micro]
        mean_of_means = sum(sum(s for s, _ in m) / sum(n for _, n in m) for m in micro) / len(micro)
        assert len(set(counts)) > 1, (name, counts)
        assert abs(mean_of_means - loss.item()) > 1e-3 * loss.item(), (name, "the test would not see a wrong average")
        grads = {k: p.grad.detach().clone() for k, p in trainable(model).items()}
        torch.save({"state": state, "loss": loss.detach(), "grads": grads, "docs": docs,
                    "tokens": [documents[d][0] for d in docs]}, tmp / f"ref_{name}.pt")
    return data


def _config(ctx, name: str):
    micro_batches = GLOBAL_BATCH // (MICRO * ctx.groups.dp_size)
    return load_config(ctx.data[name], [f"train.micro_batches={micro_batches}"])


@check("tp1", "tp2", "pp2")
def first_step_loss_and_gradients_equal_peft_with_masked_labels(ctx):
    g = ctx.groups
    for name in SCENARIOS:
        ref = torch.load(Path(ctx.tmp) / f"ref_{name}.pt")
        config = _config(ctx, name)
        data = recipe_data(config, Path(ctx.data["base"]), g.dp_size, g.dp_rank)
        model = models.from_pretrained(ctx.data["base"])
        apply_lora(model, LoraConfig(**dict(LORA, init_lora_weights=False)))
        set_adapter_state_dict(model, ref["state"])
        use_megatron_ddp(model)
        batch = data.train(0)
        loss = forward_backward(model, batch.input_ids, batch.labels, num_microbatches=config.train.micro_batches,
                                **batch.as_kwargs())
        finalize_grads(model)
        assert abs(loss.item() - ref["loss"].item()) <= TOL * ref["loss"].item(), (name, loss.item(), ref["loss"])
        grads = adapter_state_dict(model, gradients=True)
        assert sorted(grads) == sorted(ref["grads"])
        worst = max(ref["grads"], key=lambda k: rel_error(grads[k], ref["grads"][k]))
        assert rel_error(grads[worst], ref["grads"][worst]) <= TOL, (name, worst, rel_error(grads[worst], ref["grads"][worst]))


@check("tp1")
def two_data_parallel_ranks_read_disjoint_samples_of_one_cache(ctx):
    g = ctx.groups
    assert g.dp_size == 2
    for name, (fmt, packing, _) in SCENARIOS.items():
        config = _config(ctx, name)
        data = recipe_data(config, Path(ctx.data["base"]), g.dp_size, g.dp_rank)
        samples = len(data.train.samples)
        steps = -(-samples // GLOBAL_BATCH)
        mine = [data.train.indices(step) for step in range(steps)]
        everyone = all_gather_object([m.tolist() for m in mine])
        for step in range(steps):
            assert not set(everyone[0][step]) & set(everyone[1][step]), (name, step, "both ranks read a sample")
        union = {i for rank in everyone for step in rank for i in step}
        assert union == set(range(samples)), (name, "an epoch does not cover every sample")
        if not packing:  # the rows this rank reads are its documents
            ref = torch.load(Path(ctx.tmp) / f"ref_{name}.pt")
            rows = data.train(0)
            for row, index in enumerate(mine[0]):
                ids, _ = shifted(ref["tokens"][index], [1] * len(ref["tokens"][index]))
                assert torch.equal(rows.input_ids[row, : len(ids)], ids), (name, row)
        source = Path(config.data.path)
        built = sorted((source.parent / ".dist_lora_cache").glob(f"{source.name}.*"))
        assert len(built) == 1, (name, "one cache, built once by rank 0", built)
        assert not list((source.parent / ".dist_lora_cache").glob(f".{source.name}*")), "a temporary was left"


test_sft_distributed = distributed_tests(__name__, world_size=2, prepare=prepare)
