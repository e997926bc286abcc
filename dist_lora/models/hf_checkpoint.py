"""Read-only access to the safetensors weights of a Hugging Face model directory, by slice.

Single-file (``model.safetensors``) and index-sharded (``model.safetensors.index.json``)
checkpoints are supported. Reads go through ``safe_open(...).get_slice``, so a rank touches only
the bytes of the rows / columns it asks for; ``bytes_read`` counts them. Pickle checkpoints
(``*.bin``) are refused, never unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Files of a model directory that travel with its weights when a new checkpoint is written.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
              "special_tokens_map.json", "vocab.json", "merges.txt")

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class HFCheckpoint:
    """Slice reader over an HF model directory's safetensors files."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.bytes_read = 0
        self._handles: dict[str, object] = {}
        if (self.dir / INDEX).is_file():
            try:
                self.weight_map = dict(json.loads((self.dir / INDEX).read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{self.dir / INDEX} is not a valid safetensors index: {err}") from err
        elif (self.dir / SINGLE).is_file():
            self.weight_map = None
        else:
            pickles = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = (f"; found pickle weights {pickles}, which dist_lora never unpickles: convert them "
                    f"to safetensors first") if pickles else ""
            raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {self.dir}{hint}")

    def _file_of(self, name: str) -> str:
        if self.weight_map is None:
            return SINGLE
        try:
            return self.weight_map[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not listed in {self.dir / INDEX}") from None

    def _handle(self, file: str):
        if file not in self._handles:
            path = self.dir / file
            if Path(file).is_absolute() or ".." in Path(file).parts:
                raise ValueError(f"index entry {file!r} points outside {self.dir}")
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint file {path} is missing")
            try:
                self._handles[file] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise ValueError(f"checkpoint file {path} is unreadable or truncated: {err}") from err
        return self._handles[file]

    def _slice(self, name: str):
        handle = self._handle(self._file_of(name))
        if name not in handle.keys():
            raise KeyError(f"tensor {name!r} is missing from {self.dir / self._file_of(name)}")
        return handle.get_slice(name)

    def names(self) -> list[str]:
        if self.weight_map is not None:
            return list(self.weight_map)
        return list(self._handle(SINGLE).keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def read(self, name: str, rows: tuple[int, int] | None = None,
             cols: tuple[int, int] | None = None, expert: int | None = None) -> torch.Tensor:
        """Tensor ``name`` restricted to ``rows`` (dim 0) and / or ``cols`` (dim 1); with
        ``expert``, of the fused experts tensor [E, ...] the expert's matrix ``[expert]``, whose
        dims 0 and 1 are then the tensor's dims 1 and 2."""
        piece = self._slice(name)
        index = (slice(*rows) if rows else slice(None),)
        if cols:
            index = index + (slice(*cols),)
        if expert is not None:
            experts = piece.get_shape()[0]
            if not 0 <= expert < experts:
                raise ValueError(f"{name!r} in {self.dir} holds {experts} experts, not expert {expert}: the weights "
                                 f"do not match config.json")
            index = (slice(expert, expert + 1),) + index
        try:
            tensor = piece[index]
        except SafetensorError as err:
            raise ValueError(f"cannot read {name!r} from {self.dir}: {err}") from err
        if expert is not None:
            tensor = tensor[0]
        self.bytes_read += tensor.numel() * _DTYPE_BYTES.get(piece.get_dtype(), tensor.element_size())
        return tensor

    def close(self) -> None:
        self._handles.clear()
