"""The recipe's data: formats (:mod:`.formats`), the token cache (:mod:`.cache`), samples and
batches (:mod:`.samples`), tokenizers (:mod:`.tokenizer`).

:func:`recipe_data` is what a training loop calls: the cache of ``data.path`` (and of
``data.eval_path``) is built once by rank 0, every rank maps it, and each data-parallel rank
gets the batches of its own samples plus the validation samples. Without ``data.eval_path`` the
last ``data.holdout_sequences`` samples of ``data.path`` are held out for validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_lora.parallel.agreement import RankError
from dist_lora.recipes.data.cache import TokenFile, ensure, format_options
from dist_lora.recipes.data.formats import FORMATS, documents
from dist_lora.recipes.data.samples import Batch, Batches, Packed, Padded, Windows, validation_batches
from dist_lora.recipes.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["Batch", "Batches", "ByteTokenizer", "FORMATS", "HFTokenizer", "Packed", "Padded", "RecipeData",
           "TokenFile", "Windows", "documents", "ensure", "load_tokenizer", "recipe_data",
           "validation_batches"]


@dataclass
class RecipeData:
    """This rank's training batches and the held-out validation samples (every rank all of them)."""

    train: Batches
    validation: Windows | Padded

    def holdout(self, n: int):
        """The first ``n`` validation samples' input ids [n, seq_len] (the export's verification)."""
        return self.validation.rows(np.arange(min(n, len(self.validation)))).input_ids

    def validation_lines(self) -> list[int] | None:
        """Data-file lines of the validation documents (None for windows of a token stream)."""
        if isinstance(self.validation, Windows):
            return None
        return [int(self.validation.cache.lines[d]) for d in self.validation.docs]


def recipe_data(config, base: Path | None, dp_size: int, dp_rank: int) -> RecipeData:
    """Collective: the caches (built by rank 0 if missing) and this rank's batches. Bad data
    raises ``RankError`` on every rank, naming the file, line and field, before any training."""
    d, t = config.data, config.train
    train_cache = ensure(d.path, d.format, format_options(d), d.tokenizer, base, d.cache_dir)
    eval_cache = ensure(d.eval_path, d.format, format_options(d), d.tokenizer, base, d.cache_dir) if d.eval_path else None
    try:
        if FORMATS[d.format].stream:
            if eval_cache is not None:
                train, validation = Windows(train_cache, d.seq_len), Windows(eval_cache, d.seq_len)
            else:
                total = len(Windows(train_cache, d.seq_len))
                held = min(d.holdout_sequences, max(1, total // 10))
                train = Windows(train_cache, d.seq_len, 0, total - held)
                validation = Windows(train_cache, d.seq_len, total - held, held)
        else:
            docs = np.arange(len(train_cache))
            held = 0 if eval_cache is not None else min(d.holdout_sequences, max(1, len(docs) // 10))
            train = (Packed if d.packing else Padded)(train_cache, docs[: len(docs) - held], d.seq_len, d.truncate)
            if eval_cache is not None:
                validation = Padded(eval_cache, np.arange(len(eval_cache)), d.seq_len, d.truncate)
            else:
                validation = Padded(train_cache, docs[len(docs) - held:], d.seq_len, d.truncate)
        if len(train) == 0:
            raise ValueError(f"{d.path} leaves no training samples once {len(validation)} are held out for "
                             f"validation; add data or set data.eval_path")
    except ValueError as err:  # every rank reads the same cache: all fail here together
        raise RankError(str(err)) from None
    return RecipeData(Batches(train, t.micro_batch_size * t.micro_batches, dp_size, dp_rank), validation)
