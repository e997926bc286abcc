"""Write a safetensors file one tensor at a time (the library's writer needs them all in memory).

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header
length, a JSON header mapping each name to its dtype, shape and byte offsets (padded with
spaces to a multiple of 8), then the tensors' bytes in header order. The header is known up
front from (name, dtype, shape), so tensors can be produced and written one by one; files
written here are read back with ``safetensors`` in the tests.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


class StreamWriter:
    """``with StreamWriter(path, [(name, dtype, shape), ...]) as w: w.write(name, tensor)``, in order."""

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.order = [name for name, _, _ in entries]
        self.expected = {name: (dtype, tuple(shape)) for name, dtype, shape in entries}
        header, offset = {}, 0
        for name, dtype, shape in entries:
            size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype, device="meta").element_size()
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._head = struct.pack("<Q", len(raw)) + raw
        self._next = 0
        self._file = None

    def __enter__(self) -> "StreamWriter":
        self._file = open(self.path, "wb")
        self._file.write(self._head)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.order) or self.order[self._next] != name:
            raise ValueError(f"tensor {name!r} written out of order (expected "
                             f"{self.order[self._next] if self._next < len(self.order) else 'nothing'})")
        dtype, shape = self.expected[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: declared {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self._file.write(data.view(torch.uint8).numpy().data)  # the tensor's own buffer, no copy
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self._next != len(self.order):
                raise ValueError(f"{self.path}: {len(self.order) - self._next} declared tensors were not written")
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
