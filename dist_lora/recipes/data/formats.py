"""Data formats: how the records of a data file become documents (token ids + loss mask).

Files are streamed (a chunk or a line at a time), so a file of any size is never held in memory.

* ``text``: plain text, documents separated by a blank line; each is ``encode(text) + [EOS]``
  and every token counts in the loss.
* ``jsonl``: one JSON object per line, the document is its ``data.text_field``; as ``text``.
* ``chat``: one JSON object per line with ``messages``, a list of ``{"role", "content"}``,
  rendered with the tokenizer's chat template; only the tokens of assistant turns count (each
  turn as the template renders it after the generation prompt: the reply and its end-of-turn
  tokens). The template must render a conversation's first ``k`` messages as a prefix of the
  whole, which is how the assistant spans are found.
* ``completion``: one JSON object per line with ``prompt`` and ``completion``; the document is
  ``encode(prompt)`` (with the tokenizer's special tokens), then ``encode(completion)`` without
  special tokens, then EOS; only the completion and the EOS count.

Errors name the file, the line and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

_CHUNK = 1 << 20


@dataclass
class Document:
    """One sample's tokens; ``mask[i]`` is 1 where token ``i`` is a target that counts in the loss."""

    line: int
    tokens: list[int]
    mask: list[int]


def _paragraphs(path: Path) -> Iterator[tuple[int, str, int]]:
    """(first line, text, size) of each non-blank block of ``path`` (exactly ``text.split("\\n\\n")``)."""
    with open(path, encoding="utf-8") as handle:
        buffer, line = "", 1
        for chunk in iter(lambda: handle.read(_CHUNK), ""):
            *blocks, buffer = (buffer + chunk).split("\n\n")
            for block in blocks:
                if block.strip():
                    yield line, block, len(block)
                line += block.count("\n") + 2
        if buffer.strip():
            yield line, buffer, len(buffer)


def _json_lines(path: Path) -> Iterator[tuple[int, dict, int]]:
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: a record must be a JSON object, got {type(record).__name__}")
            yield number, record, len(text)


def _field(record: dict, name: str, where: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        got = "it is missing" if name not in record else f"got {type(value).__name__}"
        raise ValueError(f"{where}: field {name!r} must be a string ({got})")
    return value


def _plain(tokenizer, texts: list[tuple[int, str]]) -> list[Document]:
    if tokenizer.eos is None:
        raise ValueError(f"tokenizer {tokenizer.name} has no EOS token, which ends every document")
    ids = tokenizer.encode_batch([text for _, text in texts], add_special_tokens=True)
    return [Document(line, tokens + [tokenizer.eos], [1] * (len(tokens) + 1)) for (line, _), tokens in zip(texts, ids)]


def _text(path: Path, records, tokenizer, options) -> list[Document]:
    return _plain(tokenizer, records)


def _jsonl(path: Path, records, tokenizer, options) -> list[Document]:
    field = options["text_field"]
    return _plain(tokenizer, [(line, _field(record, field, f"{path}:{line}")) for line, record in records])


def _completion(path: Path, records, tokenizer, options) -> list[Document]:
    if tokenizer.eos is None:
        raise ValueError(f"data.format: completion ends each sample with EOS, but tokenizer {tokenizer.name} has none")
    prompts = [_field(record, "prompt", f"{path}:{line}") for line, record in records]
    completions = [_field(record, "completion", f"{path}:{line}") for line, record in records]
    documents = []
    for (line, _), p, c in zip(records, tokenizer.encode_batch(prompts, add_special_tokens=True),
                               tokenizer.encode_batch(completions, add_special_tokens=False)):
        documents.append(Document(line, p + c + [tokenizer.eos], [0] * len(p) + [1] * (len(c) + 1)))
    return documents


def _messages(record: dict, where: str) -> list[dict]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(f"{where}: field 'messages'[{i}] must be an object with string 'role' and 'content'")
    if messages[0]["role"] == "assistant":
        raise ValueError(f"{where}: field 'messages'[0] is an assistant turn; a conversation begins with the "
                         f"prompt it answers (a system or user message)")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: field 'messages' has no assistant turn; chat data trains on the assistant's "
                         f"replies (add one, or use data.format: text)")
    return messages


def _render(tokenizer, messages: list[dict], where: str, add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.render(messages, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # the template's own raise_exception, or a Jinja error
        bad = len(messages) - 1
        for k in range(1, len(messages)):
            try:
                tokenizer.render(messages[:k])
            except Exception:
                bad = k - 1
                break
        raise ValueError(f"{where}: field 'messages'[{bad}] (role {messages[bad]['role']!r}): the chat template of "
                         f"{tokenizer.name} rejected it: {err}") from None


def assistant_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    full = _render(tokenizer, messages, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], where, add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], where)
        if not (full.startswith(upto) and upto.startswith(prefix)):
            raise ValueError(f"{where}: field 'messages'[{i}]: the chat template of {tokenizer.name} does not render "
                             f"the conversation up to this assistant turn as a prefix of the whole, so its tokens "
                             f"cannot be told apart; use data.format: completion")
        spans.append((len(prefix), len(upto)))
    return full, spans


def _chat(path: Path, records, tokenizer, options) -> list[Document]:
    if not tokenizer.chat_template:
        raise ValueError(f"data.format: chat renders conversations with the tokenizer's chat template, but tokenizer "
                         f"{tokenizer.name} has none; use a model directory whose tokenizer has one "
                         f"(chat_template.jinja or tokenizer_config.json 'chat_template'), or data.format: completion")
    documents = []
    for line, record in records:
        where = f"{path}:{line}"
        full, spans = assistant_spans(tokenizer, _messages(record, where), where)
        ids, offsets = tokenizer.encode_with_offsets(full)
        mask, span = [], 0
        for begin, _ in offsets:
            while span < len(spans) and begin >= spans[span][1]:
                span += 1
            mask.append(int(span < len(spans) and spans[span][0] <= begin))
        documents.append(Document(line, ids, mask))
    return documents


@dataclass(frozen=True)
class Format:
    records: Callable[[Path], Iterator[tuple[int, object, int]]]  # (line, record, size) of a file, streamed
    encode: Callable  # (path, [(line, record)], tokenizer, options) -> [Document]
    stream: bool  # True: documents are joined and cut into windows (pre-training style)


FORMATS: dict[str, Format] = {
    "text": Format(_paragraphs, _text, stream=True),
    "jsonl": Format(_json_lines, _jsonl, stream=True),
    "chat": Format(_json_lines, _chat, stream=False),
    "completion": Format(_json_lines, _completion, stream=False),
}


def documents(path: str | Path, fmt: str, tokenizer, options: dict, batch_chars: int = 1 << 18) -> Iterator[Document]:
    """The documents of ``path`` in ``fmt``, encoded in batches of about ``batch_chars`` characters
    of records (memory stays bounded whatever the file's size)."""
    path, spec = Path(path), FORMATS[fmt]
    pending, chars = [], 0
    for line, record, size in spec.records(path):
        pending.append((line, record))
        chars += size
        if chars >= batch_chars:
            yield from spec.encode(path, pending, tokenizer, options)
            pending, chars = [], 0
    if pending:
        yield from spec.encode(path, pending, tokenizer, options)
