"""Reading and writing safetensors files without torch.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
``{"dtype", "shape", "data_offsets"}``, then the raw bytes. We read it ourselves (memory-mapped)
so that bf16 works through ``ml_dtypes``, and so that a truncated or corrupt file fails with a
message naming the file and what is wrong instead of a bare decoder error.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, corrupt, or does not fit the model."""


def read_header(path: str) -> tuple[dict[str, dict], dict[str, str], int]:
    """Returns ``(tensors, metadata, data_start)`` of a safetensors file, validating every entry."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short to be safetensors "
                                      "(truncated download?). Delete it and fetch it again.")
            (n,) = struct.unpack("<Q", raw_len)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size}; "
                                      "the file is truncated or not safetensors. Fetch it again.")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e}); the file is corrupt.") from e
    metadata = header.pop("__metadata__", {}) or {}
    data_start = 8 + n
    data_len = size - data_start
    for name, info in header.items():
        dtype = info.get("dtype")
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype!r}; supported: "
                                  f"{sorted(_DTYPES)}.")
        begin, end = info["data_offsets"]
        expected = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        if end - begin != expected:
            raise CheckpointError(f"{path}: tensor {name!r} occupies {end - begin} bytes but shape "
                                  f"{info['shape']} of {dtype} needs {expected}; the file is corrupt.")
        if end > data_len:
            raise CheckpointError(f"{path}: tensor {name!r} ends at byte {end} of the data section "
                                  f"but the file holds only {data_len}; the file is truncated. "
                                  "Fetch it again.")
    return header, metadata, data_start


class SafetensorsFile(Mapping):
    """Lazy, memory-mapped view of one safetensors file: ``file[name]`` is a numpy array."""

    def __init__(self, path: str):
        self.path = path
        self._header, self.metadata, self._start = read_header(path)
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if self._header else None

    def __getitem__(self, name: str) -> np.ndarray:
        info = self._header[name]
        begin, end = info["data_offsets"]
        raw = self._mmap[self._start + begin:self._start + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def __iter__(self):
        return iter(self._header)

    def __len__(self) -> int:
        return len(self._header)


def save_file(tensors: Mapping[str, np.ndarray], path: str,
              metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``tensors`` to ``path`` atomically (temporary file, then rename)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        if a.dtype not in _NAMES:
            raise TypeError(f"cannot store tensor {name!r} of dtype {a.dtype} in safetensors")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data section 8-byte aligned, as the reference writer does
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
