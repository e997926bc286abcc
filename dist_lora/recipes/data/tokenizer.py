"""The recipe's tokenizers: bytes (nothing to download) or the model directory's own.

Both expose the same small surface the data formats need: ``encode(text, add_special_tokens)``,
``eos`` / ``pad`` ids, ``render`` of a chat with the chat template, ``encode_with_offsets``, and a
``fingerprint`` that changes whenever the tokenizer's files change (it keys the token cache).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# Files of a Hugging Face tokenizer directory whose content decides how text becomes ids.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


class ByteTokenizer:
    """UTF-8 bytes plus BOS / EOS / PAD: 259 ids, the vocabulary of ``configs/tiny_llama.json``."""

    name = "bytes"
    vocab_size = 259
    bos, eos, pad = 256, 257, 258
    chat_template = None
    fingerprint = "bytes-v1"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([self.bos] if add_special_tokens else []) + list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(text, add_special_tokens) for text in texts]

    def render(self, messages: list, add_generation_prompt: bool = False) -> str:
        raise ValueError("the byte tokenizer has no chat template")

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer of a model directory (a fast one: chat masks need char offsets)."""

    def __init__(self, model_dir: str | Path):
        from transformers import AutoTokenizer

        self.name = str(model_dir)
        self.hf = AutoTokenizer.from_pretrained(model_dir)
        self.chat_template = self.hf.chat_template
        self.eos = self.hf.eos_token_id
        self.pad = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos
        self.vocab_size = len(self.hf)
        self.fingerprint = fingerprint("auto", model_dir)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf(text, add_special_tokens=add_special_tokens)["input_ids"]

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return self.hf(texts, add_special_tokens=add_special_tokens)["input_ids"] if texts else []

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` as it stands (no special tokens added) and each id's character span."""
        if not self.hf.is_fast:
            raise ValueError(f"tokenizer of {self.name} is not a fast tokenizer: chat loss masks need its "
                             f"character offsets; save the model directory's tokenizer.json")
        out = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        return out["input_ids"], [tuple(span) for span in out["offset_mapping"]]

    def render(self, messages: list, add_generation_prompt: bool = False) -> str:
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)


def _uses_bytes(kind: str, model_dir: str | Path | None) -> bool:
    return kind == "bytes" or model_dir is None or not any(Path(model_dir).glob("tokenizer*"))


def load_tokenizer(kind: str, model_dir: str | Path | None):
    """``bytes``, or (``auto``) the model directory's tokenizer when it has one, else bytes."""
    return ByteTokenizer() if _uses_bytes(kind, model_dir) else HFTokenizer(model_dir)


def fingerprint(kind: str, model_dir: str | Path | None) -> str:
    """What :func:`load_tokenizer` would load, as a short hash of its files (without loading it)."""
    if _uses_bytes(kind, model_dir):
        return ByteTokenizer.fingerprint
    digest = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"hf-{digest.hexdigest()[:24]}"
