"""Shared fixtures of the SFT data tests: a tiny Llama with a character-level chat tokenizer
(offline), chat and completion JSONL files, recipes for them, and an independent reference
of each document's tokens and loss mask."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from dist_lora.testing.tiny import TINY_CONFIGS, save_chat_tokenizer, save_tiny

# Conversations of different lengths and turn counts, so micro-batches hold unequal numbers of
# counted (assistant) tokens.
CHATS = [
    [("user", "what is two plus two?"), ("assistant", "four.")],
    [("system", "answer briefly."), ("user", "name a colour"), ("assistant", "blue")],
    [("user", "count to five"), ("assistant", "one, two, three, four, five.")],
    [("user", "hi"), ("assistant", "hello! how can i help?"), ("user", "a joke"), ("assistant", "no.")],
    [("user", "is ice cold?"), ("assistant", "yes, ice is cold.")],
    [("user", "spell cat"), ("assistant", "c-a-t")],
    [("system", "be terse."), ("user", "capital of france?"), ("assistant", "paris")],
    [("user", "say a long sentence please"), ("assistant", "this sentence is long enough to fill a row.")],
    [("user", "ok"), ("assistant", "k")],
    [("user", "what day is it today?"), ("assistant", "i do not know the date.")],
]
COMPLETIONS = [
    ("the sky is", " blue."), ("two and two make", " four"), ("q: largest planet? a:", " jupiter, by far."),
    ("abc", "d"), ("count: one two", " three four five six"), ("hello", " world!"),
    ("the capital of italy is", " rome"), ("x", " y z"), ("repeat after me: la la", " la la la la la la"),
    ("end", "."),
]


def chat_records(chats=CHATS) -> list[dict]:
    return [{"messages": [{"role": r, "content": c} for r, c in chat]} for chat in chats]


def completion_records(pairs=COMPLETIONS) -> list[dict]:
    return [{"prompt": p, "completion": c} for p, c in pairs]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_base(directory: Path, chat_template=...) -> Path:
    """The tiny Llama (vocab 101) with the chat tokenizer saved beside its weights; its output
    layer is scaled up so that token losses differ (a token mean then differs from a mean of
    micro-batch means by far more than the tests' tolerance)."""
    model = save_tiny(TINY_CONFIGS["llama"], directory)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(str(directory))
    if chat_template is ...:
        save_chat_tokenizer(directory)
    else:
        save_chat_tokenizer(directory, chat_template)
    return directory


def write_recipe(path: Path, base: Path, data: Path, fmt: str, eval_data: Path | None = None, **extra) -> Path:
    """A recipe YAML for ``data`` in ``fmt`` on ``base``; ``extra`` maps 'section.key' to values."""
    recipe = {"model": {"hf_dir": str(base)}, "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
              "data": {"path": str(data), "format": fmt, "seq_len": 48},
              "train": {"steps": 3, "micro_batch_size": 2, "micro_batches": 2, "lr": 0.01, "warmup_steps": 1},
              "checkpoint": {"dir": str(path.parent / "run" / "checkpoints"), "every": 100},
              "output": {"dir": str(path.parent / "run")}}
    if eval_data is not None:
        recipe["data"]["eval_path"] = str(eval_data)
    for dotted, value in extra.items():
        section, key = dotted.split(".")
        recipe.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


def reference_document(tokenizer, record: dict, fmt: str) -> tuple[list[int], list[int]]:
    """Tokens and loss mask of one record, built independently of dist_lora's formats: the
    ChatML text is assembled turn by turn (assistant turns: content + '<|im_end|>\\n' count)."""
    if fmt == "completion":
        prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        return prompt + completion + [tokenizer.eos_token_id], [0] * len(prompt) + [1] * (len(completion) + 1)
    tokens, mask = [], []
    for message in record["messages"]:
        head = tokenizer(f"<|im_start|>{message['role']}\n", add_special_tokens=False)["input_ids"]
        body = tokenizer(f"{message['content']}<|im_end|>\n", add_special_tokens=False)["input_ids"]
        tokens += head + body
        mask += [0] * len(head) + [int(message["role"] == "assistant")] * len(body)
    return tokens, mask


def shifted(tokens: list[int], mask: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids [L-1], labels [L-1] with -100 where the target does not count)."""
    t = torch.tensor(tokens)
    labels = torch.where(torch.tensor(mask[1:]) == 1, t[1:], torch.tensor(-100))
    return t[:-1], labels
