"""Held-out prompts answered by the base model and by transformers + peft with the released
adapter (greedy decoding), scored by exact match against the data's own answers.

Chat data: the prompt is the conversation up to its last assistant turn (rendered with the
generation prompt), the reference that turn's content. Completion data: ``prompt`` and
``completion``. Runs on one process (rank 0) with the Hugging Face model that verified the export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class HeldOut:
    where: str  # file:line
    prompt: object  # chat: the messages before the last assistant turn; completion: the prompt text
    reference: str


def held_out(path: str | Path, fmt: str, lines: list[int]) -> list[HeldOut]:
    """The records of ``path`` at ``lines`` (streamed: the file is read once, never whole)."""
    wanted, found = set(lines), {}
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, 1):
            if number in wanted:
                record = json.loads(text)
                if fmt == "chat":
                    messages = record["messages"]
                    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
                    found[number] = HeldOut(f"{path}:{number}", messages[:last], messages[last]["content"])
                else:
                    found[number] = HeldOut(f"{path}:{number}", record["prompt"], record["completion"])
                if len(found) == len(wanted):
                    break
    return [found[line] for line in lines]


@torch.no_grad()
def generate(model, tokenizer, items: list[HeldOut], fmt: str, max_new_tokens: int) -> list[str]:
    """Greedy answers of ``model`` to ``items``, left-padded into one batch."""
    if fmt == "chat":
        texts = [tokenizer.apply_chat_template(item.prompt, tokenize=False, add_generation_prompt=True)
                 for item in items]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        batch = tokenizer([item.prompt for item in items], return_tensors="pt", padding=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                         eos_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def compare(peft_model, base: Path, items: list[HeldOut], fmt: str, max_new_tokens: int, out: Path,
            shown: int = 3) -> str:
    """Answers of the base (adapter disabled) and of the fine-tuned model; writes
    ``out/answers.jsonl`` and returns the report to print."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "left"
    with peft_model.disable_adapter():
        before = generate(peft_model, tokenizer, items, fmt, max_new_tokens)
    after = generate(peft_model, tokenizer, items, fmt, max_new_tokens)
    with open(out / "answers.jsonl", "w") as handle:
        for item, b, a in zip(items, before, after):
            handle.write(json.dumps({"where": item.where, "prompt": item.prompt, "reference": item.reference,
                                     "base": b, "fine_tuned": a}) + "\n")
    exact_before = sum(b == item.reference.strip() for item, b in zip(items, before))
    exact_after = sum(a == item.reference.strip() for item, a in zip(items, after))
    lines = []
    for item, b, a in list(zip(items, before, after))[:shown]:
        prompt = item.prompt[-1]["content"] if fmt == "chat" else item.prompt
        lines += [f"held-out prompt ({item.where}): {prompt}", f"  reference:   {item.reference}",
                  f"  base model:  {b}", f"  fine-tuned:  {a}"]
    lines.append(f"exact match on {len(items)} held-out prompts: base model {exact_before}/{len(items)}, "
                 f"fine-tuned {exact_after}/{len(items)} (all answers: {out / 'answers.jsonl'})")
    return "\n".join(lines)
