"""Fine-tuning data: text or JSONL, tokenised, cut into fixed-length samples, split over DP ranks.

``ByteTokenizer`` needs nothing downloaded (256 byte values + BOS / EOS / PAD = 259 ids, the
vocabulary of ``configs/tiny_llama.json``); otherwise the model directory's tokenizer is used.
Samples are ``seq_len + 1`` token windows (inputs and next-token labels); step ``k`` of a job
with data-parallel size ``d`` uses global samples ``[k*B*d, (k+1)*B*d)`` and DP rank ``r`` the
``r``-th slice of them, so the data position of a resumed job is just its step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


class ByteTokenizer:
    vocab_size = 259
    bos, eos, pad = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return [self.bos, *text.encode("utf-8"), self.eos]


def tokenizer_for(kind: str, model_dir: str | None):
    if kind == "bytes" or model_dir is None or not any(Path(model_dir).glob("tokenizer*")):
        return ByteTokenizer()
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir)
    return type("HFTokenizer", (), {"encode": staticmethod(lambda t: hf(t)["input_ids"] + [hf.eos_token_id])})()


def read_texts(path: str | Path, fmt: str, field: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if fmt == "text":
        return [block for block in path.read_text().split("\n\n") if block.strip()]
    texts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            record = json.loads(line)
            if field not in record:
                raise ValueError(f"{path}:{number}: no field {field!r}")
            texts.append(record[field])
    return texts


def samples(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """All [seq_len + 1] windows of the concatenated token stream, [n, seq_len + 1]."""
    stream = [t for text in texts for t in tokenizer.encode(text)]
    n = len(stream) // (seq_len + 1)
    if n == 0:
        raise ValueError(f"the data holds {len(stream)} tokens, fewer than one sample of {seq_len + 1}")
    # Host memory: the training loop's batches move to the model's device in forward_backward.
    return torch.tensor(stream[: n * (seq_len + 1)], device="cpu").view(n, seq_len + 1)


class Batches:
    """This DP rank's (input_ids, labels) for any step, cycling over the training samples."""

    def __init__(self, data: torch.Tensor, batch: int, dp_size: int, dp_rank: int):
        self.data, self.batch, self.dp_size, self.dp_rank = data, batch, dp_size, dp_rank

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        per_step = self.batch * self.dp_size
        index = (torch.arange(per_step, device=self.data.device) + step * per_step) % len(self.data)
        rows = self.data[index.view(self.dp_size, self.batch)[self.dp_rank]]
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
