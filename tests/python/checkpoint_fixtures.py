"""Helpers of the Python tests: tensors built from numpy values and checkpoints written
with a minimal safetensors writer (so BF16 and F8 tensors can be written too)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from verify_output import DTYPES, INDEX_NAME, Tensor


def tensor(dtype: str, values: np.ndarray | list) -> Tensor:
    """A Tensor holding `values` stored as `dtype` (raw bit patterns for BF16 and F8)."""
    arr = np.asarray(values, dtype=DTYPES[dtype][0])
    return Tensor(dtype, list(arr.shape), np.ascontiguousarray(arr).tobytes())


def bf16(values: np.ndarray | list) -> Tensor:
    """A BF16 tensor of values that bfloat16 represents exactly."""
    bits = np.asarray(values, np.float32).view("<u4")
    if np.any(bits & 0xFFFF):
        raise ValueError("values are not exactly representable in bfloat16")
    return tensor("BF16", (bits >> 16).astype("<u2"))


def write_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """Writes `tensors` to a safetensors file, data in insertion order."""
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": t.dtype, "shape": t.shape,
                        "data_offsets": [offset, offset + len(t.raw)]}
        offset += len(t.raw)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(t.raw for t in tensors.values()))


def write_checkpoint(root: Path, shards: list[dict[str, Tensor]], config: dict) -> None:
    """Writes a checkpoint directory: one model.safetensors, or numbered shards and an index."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    if len(shards) == 1:
        write_safetensors(root / "model.safetensors", shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(root / name, shard)
        weight_map.update(dict.fromkeys(shard, name))
    (root / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
