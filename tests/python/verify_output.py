#!/usr/bin/env python3
"""Independent checker for a directory written by `shardpress compress`.

It reads the input checkpoint and the output directory with its own
safetensors parser (cross-checked against the `safetensors` package), decodes
compressed-tensors "pack-quantized" weights with numpy, and checks the output
against the input for one of the built-in recipes:

  w8a16  int8, symmetric, one scale per output channel
  w4a16  int4, symmetric, one scale per group of 128 columns
  bf16   every float tensor cast to bfloat16 (round to nearest even)
  fp16   every float tensor cast to float16 (round to nearest even)

Usage:
  verify_output.py --input MODEL_DIR_OR_FILE --output OUT_DIR --recipe RECIPE

A JSON summary is printed on stdout. Every failed check is printed on stderr
and the exit status is 1; a usage error exits with 2.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import safetensors
import safetensors.numpy

# safetensors dtype name -> (numpy dtype used to hold the raw values, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("<f8", 8),
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    # numpy has no bfloat16: the raw 16-bit patterns are held as uint16.
    "BF16": ("<u2", 2),
    "I64": ("<i8", 8),
    "I32": ("<i4", 4),
    "I16": ("<i2", 2),
    "I8": ("i1", 1),
    "U64": ("<u8", 8),
    "U32": ("<u4", 4),
    "U16": ("<u2", 2),
    "U8": ("u1", 1),
    "BOOL": ("?", 1),
    # numpy has no 8-bit floats: the raw 8-bit patterns are held as uint8.
    "F8_E4M3": ("u1", 1),
    "F8_E5M2": ("u1", 1),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}

RECIPES = {
    "w8a16": {"kind": "quantize", "bits": 8, "strategy": "channel", "group_size": None,
              "mean_rel_max": 0.01, "max_rel_max": 0.025},
    "w4a16": {"kind": "quantize", "bits": 4, "strategy": "group", "group_size": 128,
              "mean_rel_max": 0.13, "max_rel_max": 0.15},
    "bf16": {"kind": "cast", "dtype": "BF16", "torch_dtype": "bfloat16"},
    "fp16": {"kind": "cast", "dtype": "F16", "torch_dtype": "float16"},
}

INDEX_NAME = "model.safetensors.index.json"
SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")
QUANT_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")


class Fatal(Exception):
    """A failure after which the remaining checks cannot run."""


@dataclass
class Tensor:
    dtype: str
    shape: list[int]
    raw: bytes

    def array(self) -> np.ndarray:
        np_dtype, _ = DTYPES[self.dtype]
        return np.frombuffer(self.raw, dtype=np_dtype).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return len(self.raw)


class Checker:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.checks = 0

    def check(self, ok: bool, message: str) -> bool:
        self.checks += 1
        if not ok:
            self.failures.append(message)
        return ok


def load_json(path: Path) -> dict:
    """Reads a JSON object from `path`; anything else is fatal."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Fatal(f"{path}: cannot read JSON: {err}") from err
    if not isinstance(value, dict):
        raise Fatal(f"{path}: expected a JSON object")
    return value


# ---------------------------------------------------------------------------
# safetensors reading


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict | None]:
    """Parses a safetensors file and validates its layout."""
    data = path.read_bytes()
    if len(data) < 8:
        raise Fatal(f"{path}: shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if 8 + header_len > len(data):
        raise Fatal(f"{path}: header length {header_len} runs past the end of the file")
    try:
        header = json.loads(data[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Fatal(f"{path}: header is not UTF-8 JSON: {err}") from err
    if not isinstance(header, dict):
        raise Fatal(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    body = data[8 + header_len:]
    spans = []
    tensors: dict[str, Tensor] = {}
    for name, info in header.items():
        dtype = info.get("dtype")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if dtype not in DTYPES:
            raise Fatal(f"{path}: tensor {name}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise Fatal(f"{path}: tensor {name}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets)):
            raise Fatal(f"{path}: tensor {name}: bad data_offsets {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * DTYPES[dtype][1]
        if not (0 <= begin <= end <= len(body)) or end - begin != expected:
            raise Fatal(
                f"{path}: tensor {name}: data_offsets {offsets} do not hold "
                f"{expected} bytes of {dtype}{shape} inside a {len(body)}-byte buffer")
        spans.append((begin, end, name))
        tensors[name] = Tensor(dtype, shape, body[begin:end])
    cursor = 0
    for begin, end, name in sorted(spans):
        if begin != cursor:
            raise Fatal(f"{path}: tensor {name} starts at {begin}, expected {cursor} "
                        "(gap or overlap in the data buffer)")
        cursor = end
    if cursor != len(body):
        raise Fatal(f"{path}: data buffer has {len(body) - cursor} unindexed trailing bytes")
    return tensors, metadata


def cross_check_with_library(c: Checker, path: Path, tensors: dict[str, Tensor]) -> None:
    """Loads the file with the safetensors package and compares with our parse."""
    try:
        if any(t.dtype == "BF16" for t in tensors.values()):
            # safetensors.numpy cannot materialise bfloat16; load the rest by name.
            with safetensors.safe_open(str(path), framework="numpy") as handle:
                names = set(handle.keys())
                loaded = {n: handle.get_tensor(n) for n in names if tensors[n].dtype != "BF16"}
        else:
            loaded = safetensors.numpy.load_file(str(path))
            names = set(loaded)
    except Exception as err:  # the library's own error types vary by version
        c.check(False, f"{path.name}: safetensors failed to load it: {err}")
        return
    c.check(names == set(tensors),
            f"{path.name}: safetensors lists {sorted(names ^ set(tensors))} differently")
    for name, arr in loaded.items():
        ours = tensors[name].array()
        c.check(arr.dtype == ours.dtype and list(arr.shape) == tensors[name].shape
                and arr.tobytes() == tensors[name].raw,
                f"{path.name}: {name}: safetensors loads {arr.dtype}{list(arr.shape)}, "
                f"header says {tensors[name].dtype}{tensors[name].shape} or bytes differ")


# ---------------------------------------------------------------------------
# input


@dataclass
class Checkpoint:
    root: Path | None
    tensors: dict[str, Tensor]
    weight_files: set[str]
    other_files: set[str]


def relative_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def load_input(path: Path) -> Checkpoint:
    if path.is_file():
        tensors, _ = read_safetensors(path)
        return Checkpoint(None, tensors, {path.name}, set())
    if not path.is_dir():
        raise Fatal(f"input {path} is neither a directory nor a file")
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = load_json(index).get("weight_map") or {}
        weight_files = set(weight_map.values())
    else:
        weight_files = {p.name for p in path.glob("*.safetensors")}
    if not weight_files:
        raise Fatal(f"input {path} holds no safetensors file")
    tensors: dict[str, Tensor] = {}
    for name in sorted(weight_files):
        part, _ = read_safetensors(path / name)
        overlap = set(part) & set(tensors)
        if overlap:
            raise Fatal(f"input tensors {sorted(overlap)} appear in more than one file")
        tensors.update(part)
    skip = weight_files | {INDEX_NAME}
    others = {f for f in relative_files(path) if f not in skip}
    return Checkpoint(path, tensors, weight_files, others)


# ---------------------------------------------------------------------------
# numeric references


def bf16_bits_from_f32(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns of float32 values, rounded to nearest even."""
    u = np.ascontiguousarray(values, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(values)
    quiet = (u >> 16) | 0x40
    return np.where(nan, quiet, rounded).astype("<u2")


def f32_round_to_odd(values: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounding to odd, so a second rounding to bf16 is exact."""
    t = values.astype(np.float32)
    away = np.abs(t.astype(np.float64)) > np.abs(values)
    t[away] = np.nextafter(t[away], np.float32(0))
    inexact = (t.astype(np.float64) != values) & ~np.isnan(values)
    bits = t.view("<u4").copy()
    bits[inexact] |= 1
    return bits.view("<f4")


def float_values(t: Tensor) -> np.ndarray:
    """Exact values of a float tensor in a numpy float type (bf16 widened to f32)."""
    if t.dtype == "BF16":
        return (t.array().astype(np.uint32) << 16).view("<f4")
    return t.array()


def expected_cast(t: Tensor, target: str) -> bytes:
    values = float_values(t)
    if target == "F16":
        return np.ascontiguousarray(values.astype("<f2")).tobytes()
    if values.dtype == np.float64:
        values = f32_round_to_odd(values)
    return bf16_bits_from_f32(values.astype("<f4")).tobytes()


def cast_mismatch(t: Tensor, out: Tensor, target: str) -> str | None:
    """Describes how `out` differs from the round-to-nearest-even cast of `t`."""
    want = expected_cast(t, target)
    if out.raw == want:
        return None
    got_bits = np.frombuffer(out.raw, "<u2")
    want_bits = np.frombuffer(want, "<u2")
    # Any NaN encoding is accepted where the input is NaN.
    nan_in = np.isnan(float_values(t)).reshape(-1)
    nan_out = np.isnan(float_values(out)).reshape(-1)
    bad = np.flatnonzero(np.where(nan_in, ~nan_out, got_bits != want_bits))
    if bad.size == 0:
        return None
    i = int(bad[0])
    value = float(float_values(t).reshape(-1)[i])
    size = DTYPES[t.dtype][1]
    source_bits = int.from_bytes(t.raw[i * size:(i + 1) * size], "little")
    return (f"{bad.size} of {got_bits.size} elements differ from the round-to-nearest-even "
            f"cast; first at flat index {i}: input {value!r} ({t.dtype} bits "
            f"0x{source_bits:0{2 * size}x}), expected {target} bits 0x{int(want_bits[i]):04x}, "
            f"got 0x{int(got_bits[i]):04x}")


def error_stats(reference: np.ndarray, approx: np.ndarray) -> dict[str, float]:
    ref = reference.astype(np.float64)
    diff = approx.astype(np.float64) - ref
    ref_norm = float(np.sqrt(np.sum(ref * ref)))
    err_norm = float(np.sqrt(np.sum(diff * diff)))
    rel = err_norm / ref_norm if ref_norm > 0 else (0.0 if err_norm == 0 else math.inf)
    return {
        "rel_error": rel,
        "mse": float(np.mean(diff * diff)) if diff.size else 0.0,
        "max_abs_error": float(np.max(np.abs(diff))) if diff.size else 0.0,
    }


def unpack(packed: np.ndarray, bits: int, cols: int) -> tuple[np.ndarray, bool]:
    """Signed values of a row-wise packed int tensor, and whether padding bits are zero."""
    per_word = 32 // bits
    words = np.ascontiguousarray(packed).view("<u4")
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)[None, None, :]
    mask = np.uint32((1 << bits) - 1)
    fields = (words[:, :, None] >> shifts) & mask
    fields = fields.reshape(words.shape[0], words.shape[1] * per_word)
    padding_zero = not np.any(fields[:, cols:])
    signed = fields[:, :cols].astype(np.int64) - (1 << (bits - 1))
    return signed, padding_zero


# ---------------------------------------------------------------------------
# recipe rules


def module_of(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def ignored_by_default(name: str) -> bool:
    lower = name.lower()
    parts = lower.split(".")
    return ("norm" in lower or lower.endswith(".bias") or "embed" in lower
            or "wte" in parts or "wpe" in parts or "lm_head" in lower)


def should_quantize(name: str, t: Tensor) -> bool:
    return (t.dtype in FLOAT_DTYPES and len(t.shape) == 2 and name.endswith(".weight")
            and not ignored_by_default(name))


# ---------------------------------------------------------------------------
# the checks


def verify(input_path: Path, output: Path, recipe_name: str) -> tuple[dict, list[str]]:
    c = Checker()
    recipe = RECIPES[recipe_name]
    source = load_input(input_path)
    if not output.is_dir():
        raise Fatal(f"output {output} is not a directory")

    # Shards: named model-XXXXX-of-NNNNN.safetensors, numbered 1..NNNNN.
    out_files = relative_files(output)
    shard_names = sorted(f for f in out_files if f.endswith(".safetensors"))
    if not shard_names:
        raise Fatal(f"output {output} holds no .safetensors shard")
    numbers = []
    for name in shard_names:
        m = SHARD_RE.match(name)
        if not c.check(m is not None, f"shard {name!r} is not named model-XXXXX-of-NNNNN"):
            continue
        numbers.append((int(m.group(1)), int(m.group(2))))
    if numbers:
        c.check(sorted(numbers) == [(i, len(shard_names)) for i in range(1, len(shard_names) + 1)],
                f"shards are not numbered 1..{len(shard_names)} of {len(shard_names)}: "
                f"{shard_names}")

    out_tensors: dict[str, Tensor] = {}
    location: dict[str, str] = {}
    for name in shard_names:
        part, _ = read_safetensors(output / name)
        c.check(len(part) > 0, f"shard {name} holds no tensor")
        cross_check_with_library(c, output / name, part)
        for tname, t in part.items():
            if c.check(tname not in out_tensors,
                       f"tensor {tname} is in both {location.get(tname)} and {name}"):
                out_tensors[tname] = t
                location[tname] = name
    bytes_out = sum(t.nbytes for t in out_tensors.values())
    bytes_in = sum(t.nbytes for t in source.tensors.values())

    # Index.
    index_path = output / INDEX_NAME
    if c.check(index_path.is_file(), f"{INDEX_NAME} is missing"):
        index = load_json(index_path)
        weight_map = index.get("weight_map")
        if c.check(isinstance(weight_map, dict), f"{INDEX_NAME}: weight_map is not an object"):
            missing = sorted(set(out_tensors) - set(weight_map))
            extra = sorted(set(weight_map) - set(out_tensors))
            c.check(not missing, f"{INDEX_NAME}: weight_map lacks tensors {missing[:10]}")
            c.check(not extra, f"{INDEX_NAME}: weight_map names tensors in no shard {extra[:10]}")
            wrong = sorted(n for n in set(weight_map) & set(location)
                           if weight_map[n] != location[n])
            c.check(not wrong, f"{INDEX_NAME}: weight_map points to the wrong shard for "
                    + ", ".join(f"{n} ({weight_map[n]} vs {location[n]})" for n in wrong[:5]))
            c.check(set(weight_map.values()) == set(shard_names),
                    f"{INDEX_NAME}: weight_map files {sorted(set(weight_map.values()))} "
                    f"differ from the shards {shard_names}")
        total = (index.get("metadata") or {}).get("total_size")
        c.check(total == bytes_out,
                f"{INDEX_NAME}: metadata.total_size is {total}, tensor data is {bytes_out} bytes")

    # Every input tensor accounted for; every output tensor explained.
    quantized: list[str] = []
    explained: set[str] = set()
    for name, t in source.tensors.items():
        module = module_of(name)
        triple = [f"{module}.{s}" for s in QUANT_SUFFIXES]
        has_plain = name in out_tensors
        has_triple = [n in out_tensors for n in triple]
        if name.endswith(".weight") and any(has_triple):
            c.check(all(has_triple) and not has_plain,
                    f"{name}: output holds {[n for n, h in zip(triple, has_triple) if h]}"
                    f"{' and ' + name if has_plain else ''}; expected exactly {triple}")
            quantized.append(name)
            explained.update(n for n in triple if n in out_tensors)
        elif c.check(has_plain, f"input tensor {name} is missing from the output"):
            explained.add(name)
    unexplained = sorted(set(out_tensors) - explained)
    c.check(not unexplained, f"output tensors not derived from any input tensor: {unexplained[:10]}")

    per_tensor: dict[str, dict] = {}
    counts = {"quantized": 0, "cast": 0, "kept": 0}
    expected_actions: dict[str, str] = {}

    if recipe["kind"] == "quantize":
        expected_q = sorted(n for n, t in source.tensors.items() if should_quantize(n, t))
        c.check(sorted(quantized) == expected_q,
                "quantized tensors differ from the recipe: not quantized "
                f"{sorted(set(expected_q) - set(quantized))}, unexpectedly quantized "
                f"{sorted(set(quantized) - set(expected_q))}")
        for name, t in source.tensors.items():
            if name in quantized:
                continue
            expected_actions[name] = "keep"
            out = out_tensors.get(name)
            if out is None:
                continue
            counts["kept"] += 1
            c.check(out.dtype == t.dtype and out.shape == t.shape and out.raw == t.raw,
                    f"{name}: kept tensor differs: input {t.dtype}{t.shape}, output "
                    f"{out.dtype}{out.shape}, bytes equal={out.raw == t.raw}")
            per_tensor[name] = {"rel_error": 0.0, "mse": 0.0, "max_abs_error": 0.0}
        q_range = [0, 0]
        for name in quantized:
            expected_actions[name] = "quantize"
            counts["quantized"] += 1
            stats = check_quantized(c, name, source.tensors[name], out_tensors, recipe, q_range)
            if stats is not None:
                per_tensor[name] = stats
        rels = [per_tensor[n]["rel_error"] for n in quantized if n in per_tensor]
        mean_rel = float(np.mean(rels)) if rels else 0.0
        max_rel = float(max(rels)) if rels else 0.0
        c.check(mean_rel <= recipe["mean_rel_max"],
                f"mean relative error {mean_rel:.5f} exceeds {recipe['mean_rel_max']}")
        c.check(max_rel <= recipe["max_rel_max"],
                f"max relative error {max_rel:.5f} exceeds {recipe['max_rel_max']}")
        error_names = quantized
    else:
        target = recipe["dtype"]
        c.check(not quantized, f"cast recipe quantized {quantized[:5]}")
        q_range = None
        for name, t in source.tensors.items():
            out = out_tensors.get(name)
            if t.dtype not in FLOAT_DTYPES or t.dtype == target:
                expected_actions[name] = "keep"
                if out is None:
                    continue
                counts["kept"] += 1
                c.check(out.dtype == t.dtype and out.shape == t.shape and out.raw == t.raw,
                        f"{name}: tensor that needs no cast differs: input {t.dtype}{t.shape}, "
                        f"output {out.dtype}{out.shape}, bytes equal={out.raw == t.raw}")
                per_tensor[name] = {"rel_error": 0.0, "mse": 0.0, "max_abs_error": 0.0}
                continue
            expected_actions[name] = "cast"
            if out is None:
                continue
            counts["cast"] += 1
            if not c.check(out.dtype == target and out.shape == t.shape,
                           f"{name}: expected {target}{t.shape}, got {out.dtype}{out.shape}"):
                continue
            mismatch = cast_mismatch(t, out, target)
            c.check(mismatch is None, f"{name}: {mismatch}")
            per_tensor[name] = error_stats(float_values(t), float_values(out))
        error_names = [n for n, a in expected_actions.items() if a == "cast" and n in per_tensor]
        rels = [per_tensor[n]["rel_error"] for n in error_names]
        mean_rel = float(np.mean(rels)) if rels else 0.0
        max_rel = float(max(rels)) if rels else 0.0

    config_summary = check_config(c, source, output, recipe_name, recipe, quantized)
    copied, skipped = check_files(c, source, output, out_files, shard_names)
    report_summary = check_report(c, output, recipe_name, source, out_tensors, location,
                                  expected_actions, per_tensor, bytes_in, bytes_out,
                                  shard_names, copied, skipped)

    worst = max(error_names, key=lambda n: per_tensor[n]["rel_error"], default=None)
    summary = {
        "ok": not c.failures,
        "recipe": recipe_name,
        "checks": c.checks,
        "failures": c.failures,
        "shards": len(shard_names),
        "tensors_in": len(source.tensors),
        "tensors_out": len(out_tensors),
        "quantized": counts["quantized"],
        "cast": counts["cast"],
        "kept": counts["kept"],
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "rel_error": {"mean": mean_rel, "max": max_rel, "worst_tensor": worst,
                      "tensors": len(rels)},
        "quantized_value_range": q_range,
        "config": config_summary,
        "copied_files": sorted(copied),
        "skipped_files": sorted(skipped),
        "report": report_summary,
    }
    return summary, c.failures


def check_quantized(c: Checker, name: str, t: Tensor, out_tensors: dict[str, Tensor],
                    recipe: dict, q_range: list[int]) -> dict | None:
    module = module_of(name)
    packed = out_tensors.get(f"{module}.weight_packed")
    scale = out_tensors.get(f"{module}.weight_scale")
    shape_t = out_tensors.get(f"{module}.weight_shape")
    if packed is None or scale is None or shape_t is None:
        return None
    bits = recipe["bits"]
    rows, cols = t.shape
    group = cols if recipe["strategy"] == "channel" else recipe["group_size"]
    n_groups = 1 if recipe["strategy"] == "channel" else -(-cols // group)
    words = -(-cols * bits // 32)
    ok = c.check(packed.dtype == "I32" and packed.shape == [rows, words],
                 f"{module}.weight_packed: expected I32{[rows, words]}, "
                 f"got {packed.dtype}{packed.shape}")
    ok &= c.check(scale.dtype == t.dtype and scale.shape == [rows, n_groups],
                  f"{module}.weight_scale: expected {t.dtype}{[rows, n_groups]}, "
                  f"got {scale.dtype}{scale.shape}")
    ok &= c.check(shape_t.dtype == "I64" and shape_t.shape == [2]
                  and shape_t.array().tolist() == [rows, cols],
                  f"{module}.weight_shape: expected I64[2] = {[rows, cols]}, got "
                  f"{shape_t.dtype}{shape_t.shape} = {shape_t.array().tolist()}")
    if not ok:
        return None
    q, padding_zero = unpack(packed.array(), bits, cols)
    c.check(padding_zero, f"{module}.weight_packed: padding bits past column {cols} are not zero")
    q_range[0] = min(q_range[0], int(q.min()))
    q_range[1] = max(q_range[1], int(q.max()))
    scales = float_values(scale).astype(np.float64)
    c.check(bool(np.all(np.isfinite(scales)) and np.all(scales >= 0)),
            f"{module}.weight_scale: holds negative or non-finite values")
    per_column = np.repeat(scales, group, axis=1)[:, :cols]
    dequantized = q.astype(np.float64) * per_column
    stats = error_stats(float_values(t), dequantized)
    limit = recipe["max_rel_max"]
    c.check(stats["rel_error"] <= limit,
            f"{name}: relative Frobenius error {stats['rel_error']:.5f} exceeds {limit}")
    return stats


def check_config(c: Checker, source: Checkpoint, output: Path, recipe_name: str,
                 recipe: dict, quantized: list[str]) -> dict | None:
    if source.root is None or not (source.root / "config.json").is_file():
        return None
    config_path = output / "config.json"
    if not c.check(config_path.is_file(), "config.json is missing from the output"):
        return None
    before = load_json(source.root / "config.json")
    after = load_json(config_path)
    changed = {"quantization_config", "torch_dtype"}
    for key in sorted(set(before) - changed):
        c.check(after.get(key) == before[key],
                f"config.json: {key} changed from {before[key]!r} to {after.get(key)!r}")
    extra = sorted(set(after) - set(before) - changed)
    c.check(not extra, f"config.json: unexpected new keys {extra}")
    if recipe["kind"] == "cast":
        c.check(after.get("torch_dtype") == recipe["torch_dtype"],
                f"config.json: torch_dtype is {after.get('torch_dtype')!r}, "
                f"expected {recipe['torch_dtype']!r}")
        c.check("quantization_config" not in after,
                "config.json: a cast recipe added quantization_config")
        return {"torch_dtype": after.get("torch_dtype")}

    qc = after.get("quantization_config")
    if not c.check(isinstance(qc, dict), "config.json: quantization_config is missing"):
        return None
    for key, want in (("quant_method", "compressed-tensors"), ("format", "pack-quantized"),
                      ("quantization_status", "compressed")):
        c.check(qc.get(key) == want,
                f"config.json: quantization_config.{key} is {qc.get(key)!r}, expected {want!r}")
    groups = qc.get("config_groups")
    if c.check(isinstance(groups, dict) and list(groups) == ["group_0"],
               f"config.json: config_groups should hold exactly group_0, got {groups!r}"):
        g = groups["group_0"]
        c.check(g.get("targets") == ["Linear"],
                f"config.json: group_0.targets is {g.get('targets')!r}, expected ['Linear']")
        c.check(g.get("format") == "pack-quantized",
                f"config.json: group_0.format is {g.get('format')!r}")
        w = g.get("weights")
        if c.check(isinstance(w, dict), "config.json: group_0.weights is missing"):
            expected = {"num_bits": recipe["bits"], "type": "int", "symmetric": True,
                        "strategy": recipe["strategy"], "group_size": recipe["group_size"]}
            for key, want in expected.items():
                got = w.get(key, "<absent>")
                c.check(got == want and type(got) is type(want),
                        f"config.json: group_0.weights.{key} is {got!r}, expected {want!r}")
    ignore = qc.get("ignore")
    if c.check(isinstance(ignore, list) and all(isinstance(i, str) for i in ignore),
               f"config.json: quantization_config.ignore is not a list of names: {ignore!r}"):
        quantized_modules = {module_of(n) for n in quantized}
        wrongly = sorted(set(ignore) & quantized_modules)
        c.check(not wrongly, f"config.json: ignore lists quantized modules {wrongly}")
        expected_ignore = {module_of(n) for n, t in source.tensors.items()
                           if n.endswith(".weight") and len(t.shape) == 2
                           and n not in quantized}
        c.check(set(ignore) == expected_ignore,
                f"config.json: ignore should name the unquantized 2-D weights' modules; "
                f"missing {sorted(expected_ignore - set(ignore))}, "
                f"extra {sorted(set(ignore) - expected_ignore)}")
        c.check(len(ignore) == len(set(ignore)), "config.json: ignore has duplicates")
    return {"quant_method": qc.get("quant_method"), "ignore": ignore}


def check_files(c: Checker, source: Checkpoint, output: Path, out_files: set[str],
                shard_names: list[str]) -> tuple[set[str], set[str]]:
    report_path = output / "report.json"
    report = load_json(report_path) if report_path.is_file() else {}
    listed_copied = report.get("copied_files", [])
    listed_skipped = report.get("skipped_files", [])
    for key, listed in (("copied_files", listed_copied), ("skipped_files", listed_skipped)):
        c.check(isinstance(listed, list) and all(isinstance(f, str) for f in listed),
                f"report.json: {key} is not a list of paths: {listed!r}")
    copied = {PurePosixPath(f).as_posix() for f in listed_copied if isinstance(f, str)}
    skipped = {PurePosixPath(f).as_posix() for f in listed_skipped if isinstance(f, str)}

    expected_copies = source.other_files - {"config.json"}
    for rel in sorted(expected_copies):
        if c.check((output / rel).is_file(), f"input file {rel} was not copied to the output"):
            c.check((output / rel).read_bytes() == (source.root / rel).read_bytes(),
                    f"copied file {rel} differs from the input")
    # config.json is rewritten rather than copied; listing it is allowed either way.
    listed = copied - {"config.json"}
    c.check(listed == expected_copies,
            f"report.json: copied_files should list {sorted(expected_copies)}; "
            f"missing {sorted(expected_copies - listed)}, extra {sorted(listed - expected_copies)}")
    c.check(not (skipped & expected_copies),
            f"report.json: skipped_files names files that must be copied: "
            f"{sorted(skipped & expected_copies)}")
    known = set(shard_names) | {INDEX_NAME, "config.json", "report.json", "report.md", "report.html"} | expected_copies
    extra = sorted(out_files - known)
    c.check(not extra, f"output holds unexpected files {extra}")
    for required in ("report.json", "report.md", "report.html", INDEX_NAME):
        c.check(required in out_files, f"output lacks {required}")
    return copied, skipped


def close(a: float, b: float, rtol: float = 2e-3, atol: float = 1e-12) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= atol + rtol * max(abs(a), abs(b))


def check_report(c: Checker, output: Path, recipe_name: str, source: Checkpoint,
                 out_tensors: dict[str, Tensor], location: dict[str, str],
                 expected_actions: dict[str, str], per_tensor: dict[str, dict],
                 bytes_in: int, bytes_out: int, shard_names: list[str],
                 copied: set[str], skipped: set[str]) -> dict | None:
    path = output / "report.json"
    if not path.is_file():
        return None
    report = load_json(path)
    c.check(report.get("report_version") == 1,
            f"report.json: report_version is {report.get('report_version')!r}, expected 1")
    c.check(report.get("recipe_name") == recipe_name,
            f"report.json: recipe_name is {report.get('recipe_name')!r}, expected {recipe_name!r}")
    totals = report.get("totals") or {}
    actions = list(expected_actions.values())
    want_totals = {
        "tensors": len(source.tensors),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "quantized": actions.count("quantize"),
        "cast": actions.count("cast"),
        "kept": actions.count("keep"),
    }
    for key, want in want_totals.items():
        c.check(totals.get(key) == want,
                f"report.json: totals.{key} is {totals.get(key)!r}, the files give {want}")
    ratio = totals.get("ratio")
    c.check(isinstance(ratio, (int, float)) and bytes_out > 0
            and close(float(ratio), bytes_in / bytes_out, rtol=1e-6),
            f"report.json: totals.ratio is {ratio!r}, bytes_in/bytes_out is "
            f"{bytes_in / bytes_out if bytes_out else math.inf}")

    entries = report.get("tensors")
    if not c.check(isinstance(entries, list), "report.json: tensors is not a list"):
        return {"totals": totals}
    by_name = {}
    for e in entries:
        by_name.setdefault(e.get("name"), []).append(e)
    dupes = sorted(n for n, es in by_name.items() if len(es) > 1)
    c.check(not dupes, f"report.json: tensors listed twice: {dupes[:5]}")
    c.check(set(by_name) == set(source.tensors),
            f"report.json: tensor entries differ from the input: missing "
            f"{sorted(set(source.tensors) - set(by_name))[:5]}, extra "
            f"{sorted(set(by_name) - set(source.tensors), key=str)[:5]}")
    c.check(len(entries) == totals.get("tensors"),
            f"report.json: {len(entries)} tensor entries but totals.tensors is "
            f"{totals.get('tensors')!r}")
    mismatches = 0
    for name, t in source.tensors.items():
        if name not in by_name:
            continue
        e = by_name[name][0]
        action = expected_actions.get(name)
        if action == "quantize":
            m = module_of(name)
            outputs = [f"{m}.{s}" for s in QUANT_SUFFIXES]
        else:
            outputs = [name]
        outputs = [o for o in outputs if o in out_tensors]
        problems = []
        if e.get("action") != action:
            problems.append(f"action {e.get('action')!r} != {action!r}")
        if e.get("dtype") != t.dtype:
            problems.append(f"dtype {e.get('dtype')!r} != {t.dtype!r}")
        if e.get("shape") != t.shape:
            problems.append(f"shape {e.get('shape')!r} != {t.shape!r}")
        if e.get("bytes_in") != t.nbytes:
            problems.append(f"bytes_in {e.get('bytes_in')!r} != {t.nbytes}")
        want_out = sum(out_tensors[o].nbytes for o in outputs)
        if e.get("bytes_out") != want_out:
            problems.append(f"bytes_out {e.get('bytes_out')!r} != {want_out}")
        if sorted(e.get("outputs") or []) != sorted(outputs):
            problems.append(f"outputs {e.get('outputs')!r} != {outputs!r}")
        shards = {location[o] for o in outputs}
        if len(shards) != 1 or e.get("shard") not in shards:
            problems.append(f"shard {e.get('shard')!r} but outputs are in {sorted(shards)}")
        stats = per_tensor.get(name)
        if stats is not None and action != "keep":
            for key in ("rel_error", "mse", "max_abs_error"):
                got = e.get(key)
                if not isinstance(got, (int, float)) or not close(float(got), stats[key]):
                    problems.append(f"{key} {got!r} != {stats[key]!r}")
            rel = stats["rel_error"]
            want_snr = -20.0 * math.log10(rel) if rel > 0 else math.inf
            got_snr = e.get("snr_db")
            if rel > 0 and (not isinstance(got_snr, (int, float))
                            or not close(float(got_snr), want_snr, rtol=1e-3, atol=1e-3)):
                problems.append(f"snr_db {got_snr!r} != {want_snr!r}")
        if problems:
            mismatches += 1
            if mismatches <= 10:
                c.check(False, f"report.json: {name}: " + "; ".join(problems))
    c.check(mismatches == 0, f"report.json: {mismatches} tensor entries disagree with the files")
    c.check(isinstance(report.get("shards"), list)
            and len(report["shards"]) == len(shard_names),
            f"report.json: shards has {len(report.get('shards') or [])} entries, "
            f"output has {len(shard_names)} shard files")
    return {"totals": totals}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, type=Path,
                        help="the checkpoint given to shardpress compress")
    parser.add_argument("--output", required=True, type=Path,
                        help="the directory shardpress compress wrote")
    parser.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    args = parser.parse_args(argv)
    try:
        summary, failures = verify(args.input, args.output, args.recipe)
    except Fatal as err:
        print(json.dumps({"ok": False, "recipe": args.recipe, "failures": [str(err)]}, indent=2))
        print(f"verify_output: FAILED: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    if failures:
        print(f"verify_output: FAILED {len(failures)} of {summary['checks']} checks "
              f"({args.recipe}, {args.output}):", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        return 1
    print(f"verify_output: OK, {summary['checks']} checks passed ({args.recipe})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
