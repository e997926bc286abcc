"""The token cache: a data file tokenised once into memory-mapped arrays kept beside it.

``<data dir>/.dist_lora_cache/<file name>.<key>/`` (or under ``data.cache_dir``) holds

* ``tokens.bin`` int32 [T]: every document's token ids, back to back;
* ``mask.bin`` uint8 [T]: 1 where the token is a target that counts in the loss;
* ``offsets.bin`` int64 [N + 1]: where document ``i`` starts (``offsets[N] = T``);
* ``lines.bin`` int64 [N]: the line of the data file each document comes from (for errors);
* ``meta.json``: what it was built from, the counts, the tokenizer's EOS and PAD ids.

The key hashes the file's resolved path, size and modification time, the tokenizer's files
(:func:`~dist_lora.recipes.data.tokenizer.fingerprint`), the format and its options: change any
of them and the next job builds a new cache (old ones may be deleted at any time). The build
streams the file (a 1 GB JSONL is never held in memory), writes into a temporary sibling and
renames it into place when complete, so a half-built cache is never read. In a job, rank 0
builds while the others wait; every rank then maps the arrays read-only and reads only the
rows it trains on. The cache directory must be visible to every rank (a shared file system
across nodes, as for checkpoints). The waiting ranks wait inside a collective, bounded by
``DIST_LORA_TIMEOUT_S`` (1800 s): a file that takes longer to tokenise is prepared ahead with
``dist-lora tokenize RECIPE``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_lora.checkpoint.atomic import fsync_tree, temporary_sibling
from dist_lora.parallel.agreement import RankError
from dist_lora.parallel.collectives import broadcast_object, group_rank
from dist_lora.recipes.data.formats import documents
from dist_lora.recipes.data.tokenizer import fingerprint, load_tokenizer

VERSION = 1
DIRNAME = ".dist_lora_cache"
_FLUSH = 1 << 20  # tokens buffered before a write


@dataclass
class TokenFile:
    """A built cache, memory-mapped read-only (nothing is read until indexed)."""

    directory: Path
    source: Path
    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    lines: np.ndarray
    meta: dict

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each document, [N] int64."""
        return np.diff(self.offsets)


def format_options(data) -> dict:
    """The options of ``data.format`` that change its tokens (they key the cache)."""
    return {"text_field": data.text_field} if data.format == "jsonl" else {}


def identity(path: Path, fmt: str, options: dict, tokenizer_fingerprint: str) -> dict:
    stat = path.stat()
    return {"version": VERSION, "file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "format": fmt, "options": options, "tokenizer": tokenizer_fingerprint}


def cache_dir(path: Path, root: str | Path | None, ident: dict) -> Path:
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return (Path(root) if root is not None else path.parent / DIRNAME) / f"{path.name}.{key}"


def open_cache(directory: Path, source: Path) -> TokenFile:
    meta = json.loads((directory / "meta.json").read_text())

    def mapped(name: str, dtype) -> np.ndarray:
        if (directory / name).stat().st_size == 0:
            return np.zeros(0, dtype)
        return np.memmap(directory / name, dtype=dtype, mode="r")

    return TokenFile(directory, source, mapped("tokens.bin", np.int32), mapped("mask.bin", np.uint8),
                     mapped("offsets.bin", np.int64), mapped("lines.bin", np.int64), meta)


def build(path: Path, fmt: str, options: dict, tokenizer, target: Path, ident: dict) -> None:
    """Tokenise ``path`` into ``target`` (streamed; published by one rename when complete)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    began = time.perf_counter()
    try:
        count = total = longest = 0
        files = {name: open(tmp / f"{name}.bin", "wb") for name in ("tokens", "mask", "offsets", "lines")}
        try:
            files["offsets"].write(np.zeros(1, np.int64).tobytes())
            pending: dict[str, list] = {name: [] for name in files}
            buffered = 0

            def flush():
                for name, dtype in (("tokens", np.int32), ("mask", np.uint8), ("offsets", np.int64),
                                    ("lines", np.int64)):
                    if pending[name]:
                        np.concatenate(pending[name]).astype(dtype, copy=False).tofile(files[name])
                    pending[name] = []

            for doc in documents(path, fmt, tokenizer, options):
                n = len(doc.tokens)
                pending["tokens"].append(np.asarray(doc.tokens, np.int32))
                pending["mask"].append(np.asarray(doc.mask, np.uint8))
                total, longest, count, buffered = total + n, max(longest, n), count + 1, buffered + n
                pending["offsets"].append(np.array([total], np.int64))
                pending["lines"].append(np.array([doc.line], np.int64))
                if buffered >= _FLUSH:
                    flush()
                    buffered = 0
            flush()
        finally:
            for handle in files.values():
                handle.close()
        if count == 0:
            raise ValueError(f"{path}: no {fmt} records (the file is empty); point data.path / data.eval_path at "
                             f"a file with data")
        meta = {"identity": ident, "documents": count, "tokens": total, "longest": longest,
                "eos": tokenizer.eos, "pad": tokenizer.pad, "seconds": round(time.perf_counter() - began, 3)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        fsync_tree(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another job published the same cache first: keep theirs
            if not (target / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure(path: str | Path, fmt: str, options: dict, tokenizer_kind: str, model_dir: str | Path | None,
           root: str | Path | None = None) -> TokenFile:
    """Collective over the job: the cache of ``path``, built by rank 0 if missing (the others
    wait); a bad file raises ``RankError`` on every rank with rank 0's message (file, line, field)."""
    path = Path(path)
    answer = None
    if group_rank() == 0:
        try:
            if not path.is_file():
                raise FileNotFoundError(f"data file {path} does not exist")
            ident = identity(path, fmt, options, fingerprint(tokenizer_kind, model_dir))
            target = cache_dir(path, root, ident)
            if not (target / "meta.json").is_file():
                print(f"tokenising {path} ({fmt}) into {target} ...", file=sys.stderr, flush=True)
                build(path, fmt, options, load_tokenizer(tokenizer_kind, model_dir), target, ident)
            answer = ("ok", str(target))
        except (OSError, ValueError) as err:
            answer = ("error", str(err))
    status, value = broadcast_object(answer)
    if status == "error":
        raise RankError(value)
    return open_cache(Path(value), path)

