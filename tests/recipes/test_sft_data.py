"""Chat / completion data on one process: loss masks against an independent tokenisation, padded
and packed samples, truncation, and every bad input named by file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from dist_lora.parallel.agreement import RankError
from dist_lora.recipes.config import load_config
from dist_lora.recipes.data import Packed, Padded, ensure, recipe_data
from dist_lora.testing.tiny import CHATML_TEMPLATE
from tests.recipes.sft_fixtures import (
    chat_records,
    completion_records,
    make_base,
    reference_document,
    shifted,
    write_jsonl,
    write_recipe,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("sft_base"))


def _data(tmp_path, base, records, fmt="chat", **extra):
    path = write_jsonl(tmp_path / f"data_{fmt}.jsonl", records)
    config = load_config(write_recipe(tmp_path / "recipe.yaml", base, path, fmt, **extra))
    return recipe_data(config, base, 1, 0)


@pytest.mark.parametrize("fmt", ["chat", "completion"])
def test_masks_count_only_assistant_turns_or_completions_and_eos(tmp_path, base, fmt):
    records = chat_records() if fmt == "chat" else completion_records()
    cache = ensure(write_jsonl(tmp_path / "d.jsonl", records), fmt, {}, "auto", base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert len(cache) == len(records)
    for i, record in enumerate(records):
        tokens, mask = reference_document(tokenizer, record, fmt)
        start, end = cache.offsets[i], cache.offsets[i + 1]
        assert list(cache.tokens[start:end]) == tokens and list(cache.mask[start:end]) == mask, i
        assert int(cache.lines[i]) == i + 1
    counted = tokenizer.decode([t for t, m in zip(tokens, mask) if m])
    expected = (records[-1]["messages"][-1]["content"] + "<|im_end|>\n" if fmt == "chat"
                else records[-1]["completion"] + "<|im_end|>")
    assert counted == expected


def test_padded_and_packed_samples_hold_the_documents_and_a_document_mask(tmp_path, base):
    records = chat_records()
    cache = ensure(write_jsonl(tmp_path / "d.jsonl", records), "chat", {}, "auto", base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    docs = np.arange(len(records))
    padded = Padded(cache, docs, 96, truncate=False).rows(docs)
    for i, record in enumerate(records):
        ids, labels = shifted(*reference_document(tokenizer, record, "chat"))
        n = len(ids)
        assert torch.equal(padded.input_ids[i, :n], ids) and torch.equal(padded.labels[i, :n], labels)
        assert (padded.labels[i, n:] == -100).all() and (padded.input_ids[i, n:] == tokenizer.pad_token_id).all()
    packed = Packed(cache, docs, 160, truncate=False)
    assert len(packed) < len(records)
    batch = packed.rows(np.arange(len(packed)))
    seen = 0
    for row in range(len(packed)):
        at = 0
        for doc in range(packed.starts[row], packed.starts[row + 1]):
            ids, labels = shifted(*reference_document(tokenizer, records[doc], "chat"))
            n = len(ids)
            assert torch.equal(batch.input_ids[row, at:at + n], ids) and torch.equal(batch.labels[row, at:at + n], labels)
            assert torch.equal(batch.position_ids[row, at:at + n], torch.arange(n))
            block = ~batch.attention_mask[row, 0, at:at + n, :]  # what these positions may attend to
            assert torch.equal(block[:, at:at + n], torch.ones(n, n, dtype=torch.bool).tril())
            assert not block[:, :at].any() and not block[:, at + n:].any(), "attention crosses a document"
            at, seen = at + n, seen + 1
        assert at <= 160
    assert seen == len(records)


def test_too_long_samples_are_refused_naming_file_line_and_the_key_or_truncated(tmp_path, base):
    records = chat_records()
    with pytest.raises(RankError, match=r"data_chat.jsonl:2: a sample of 63 tokens is longer than data.seq_len "
                                        r"\+ 1 = 49 \(6 of 9 samples are\).*data.truncate: true"):
        _data(tmp_path, base, records)
    data = _data(tmp_path, base, records, **{"data.truncate": True})
    assert len(data.train.samples) == len(records) - 1  # one held out for validation
    assert int(data.train.samples.positions.max()) == 48


@pytest.mark.parametrize("records,needle", [
    ([{"messages": [{"role": "user", "content": "hi"}]}], r"d.jsonl:1: field 'messages' has no assistant turn"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
      {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "x"},
                    {"role": "assistant", "content": "b"}]}],
     r"d.jsonl:2: field 'messages'\[1\] \(role 'tool'\): the chat template of .* rejected it: unknown role tool"),
    ([{"messages": "hello"}], r"d.jsonl:1: field 'messages' must be a non-empty list"),
    ([{"messages": [{"role": "user"}]}], r"d.jsonl:1: field 'messages'\[0\] must be an object with string"),
    ([{"text": "x"}], r"d.jsonl:1: field 'messages' must be a non-empty list"),
])
def test_bad_chat_records_name_file_line_and_field(tmp_path, base, records, needle):
    with pytest.raises(RankError, match=needle):
        ensure(write_jsonl(tmp_path / "d.jsonl", records), "chat", {}, "auto", base)
    assert not list((tmp_path / ".dist_lora_cache").glob("*")), "a failed build left files behind"


def test_bad_completion_records_and_json_name_file_line_and_field(tmp_path, base):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    with pytest.raises(RankError, match=r"d.jsonl:2: field 'completion' must be a string \(it is missing\)"):
        ensure(path, "completion", {}, "auto", base)
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
    with pytest.raises(RankError, match=r"d.jsonl:2: not valid JSON"):
        ensure(path, "completion", {}, "auto", base)


def test_chat_needs_a_tokenizer_with_a_chat_template(tmp_path):
    bare = make_base(tmp_path / "bare", chat_template=None)
    path = write_jsonl(tmp_path / "d.jsonl", chat_records())
    with pytest.raises(RankError, match=r"data.format: chat .* tokenizer .*bare has none"):
        ensure(path, "chat", {}, "auto", bare)
    with pytest.raises(RankError, match=r"data.format: chat .* tokenizer bytes has none"):
        ensure(path, "chat", {}, "bytes", None)


@pytest.mark.parametrize("fmt", ["chat", "completion", "jsonl", "text"])
def test_an_empty_data_file_is_named(tmp_path, base, fmt):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(RankError, match=rf"empty.jsonl: no {fmt} records \(the file is empty\)"):
        ensure(path, fmt, {"text_field": "text"} if fmt == "jsonl" else {}, "auto", base)


def test_recipe_keys_for_sft_data_are_checked(tmp_path, base):
    path = write_jsonl(tmp_path / "d.jsonl", chat_records())
    recipe = write_recipe(tmp_path / "r.yaml", base, path, "chat")
    with pytest.raises(ValueError, match="data.packing needs data.format chat or completion"):
        load_config(recipe, ["data.format=text", "data.packing=true"])
    with pytest.raises(ValueError, match="output.answer_prompts needs data.format chat or completion"):
        load_config(recipe, ["data.format=jsonl", "output.answer_prompts=2"])
    assert load_config(recipe, ["data.packing=true"]).data.packing


def test_the_template_of_the_fixture_is_the_chatml_one(base):
    assert json.loads((base / "tokenizer_config.json").read_text()).get("chat_template", CHATML_TEMPLATE)
    assert AutoTokenizer.from_pretrained(base).chat_template == CHATML_TEMPLATE
