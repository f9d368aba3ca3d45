#!/usr/bin/env python3
"""Independent numpy decoder of every tensor layout `shardpress compress` writes.

It reads a compressed checkpoint (config.json with a compressed-tensors
`quantization_config`, plus `model.safetensors.index.json` and its shards or a
single `model.safetensors`), decodes every module from its stored tensors using
only the layout definitions below, and compares the result bit for bit with the
dense checkpoint `shardpress decompress --dtype DTYPE` wrote.

Layouts of a module `m` whose dense weight `m.weight` is [rows, cols]:

  pack-quantized   m.weight_packed I32 [rows, ceil(cols/pf)] with pf = 32 // bits
                   offset-binary values per little-endian word, first value in
                   the lowest bits; m.weight_shape I64 [2]; m.weight_scale;
                   m.weight_zero_point I32 packed the same way along rows
                   (asymmetric only)
  int-quantized    m.weight I8, m.weight_scale, m.weight_zero_point I8
                   (asymmetric only)
  float-quantized  m.weight F8_E4M3 or F8_E5M2, m.weight_scale
  sparse-bitmask   m.shape I64 [2], m.compressed (the non-zero values in
                   row-major order), m.bitmask U8 [rows, ceil(cols/8)] (little
                   bit order), m.row_offsets I64 [rows]
  dense            m.weight as stored (pruned, zeros kept in place)

Weight scales hold one value (strategy tensor, shape [1]), one per row
(channel, [rows, 1]) or one per row and group of columns (group,
[rows, ceil(cols/group_size)]). Quantized weights dequantize in float32 to
float32(q - z) * float32(scale).

Usage:
  decode_output.py --output OUT_DIR --decompressed DEC_DIR --dtype {bf16,f16,f32}

A JSON summary is printed on stdout. Every failure is printed on stderr and the
exit status is 1; a usage error exits with 2.

As a library: `decode_checkpoint(out_dir)` returns a `Decoded` (dense tensors,
the layout each was stored in, and the pruned weights) or raises `DecodeError`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from verify_output import (
    DTYPES,
    FLOAT_DTYPES,
    INDEX_NAME,
    Checkpoint,
    Fatal,
    Tensor,
    bf16_bits_from_f32,
    f32_round_to_odd,
    float_values,
    load_input,
    load_json,
)

PACK = "pack-quantized"
INT = "int-quantized"
FLOAT = "float-quantized"
BITMASK = "sparse-bitmask"
DENSE = "dense"
UNCOMPRESSED = "uncompressed"
QUANTIZED_FORMATS = (PACK, INT, FLOAT)
SPARSITY_FORMATS = (BITMASK, DENSE)

QUANT_SUFFIXES = ("weight_packed", "weight_shape", "weight_scale", "weight_zero_point")
SPARSE_SUFFIXES = ("shape", "compressed", "bitmask", "row_offsets")
SCALE_DTYPES = {"F32", "F16", "BF16"}
STRATEGIES = ("tensor", "channel", "group")

# --dtype value -> (safetensors dtype, config.json torch_dtype)
TARGETS: dict[str, tuple[str, str]] = {
    "bf16": ("BF16", "bfloat16"),
    "f16": ("F16", "float16"),
    "f32": ("F32", "float32"),
}


class FormatError(Exception):
    """A stored layout that breaks its format definition."""


class DecodeError(Exception):
    """Raised by `decode_checkpoint` when any tensor fails to decode."""

    def __init__(self, failures: list[str]) -> None:
        super().__init__(f"{len(failures)} decode failures: " + "; ".join(failures[:5]))
        self.failures = failures


def require(ok: bool, message: str) -> None:
    if not ok:
        raise FormatError(message)


# ---------------------------------------------------------------------------
# element decoding


def fp8_table(exponent_bits: int, mantissa_bits: int, ieee: bool) -> np.ndarray:
    """float32 value of each of the 256 codes of an 8-bit float with one sign bit.

    The exponent bias is 2**(exponent_bits - 1) - 1 and exponent field 0 holds
    subnormals. With `ieee` the all-ones exponent holds infinities (mantissa 0)
    and NaNs; otherwise (the "fn" variants) only the all-ones exponent and
    mantissa is NaN and the rest of that exponent holds normal numbers.
    """
    codes = np.arange(256, dtype=np.int64)
    bias = (1 << (exponent_bits - 1)) - 1
    top = (1 << exponent_bits) - 1
    mantissa_top = (1 << mantissa_bits) - 1
    exponent = (codes >> mantissa_bits) & top
    mantissa = codes & mantissa_top
    fraction = mantissa / (1 << mantissa_bits)
    magnitude = np.where(exponent == 0, fraction * 2.0 ** (1 - bias),
                         (1.0 + fraction) * np.exp2(exponent - bias))
    if ieee:
        special = np.where(mantissa == 0, np.inf, np.nan)
        magnitude = np.where(exponent == top, special, magnitude)
    else:
        magnitude = np.where((exponent == top) & (mantissa == mantissa_top), np.nan, magnitude)
    sign = np.where((codes >> 7) == 1, -1.0, 1.0)
    return (sign * magnitude).astype(np.float32)


FP8_TABLES: dict[str, np.ndarray] = {
    "F8_E4M3": fp8_table(4, 3, ieee=False),
    "F8_E5M2": fp8_table(5, 2, ieee=True),
}
# numpy dtype -> safetensors dtype of the tensors kept as integers or booleans.
INTEGER_DTYPES = {np.dtype(DTYPES[d][0]): d for d in DTYPES
                  if d not in FLOAT_DTYPES and d not in FP8_TABLES}


def is_float(t: Tensor) -> bool:
    return t.dtype in FLOAT_DTYPES or t.dtype in FP8_TABLES


def float_array(t: Tensor) -> np.ndarray:
    """Exact values of a float tensor: float32, or float64 for an F64 tensor."""
    if t.dtype in FP8_TABLES:
        return FP8_TABLES[t.dtype][t.array()]
    return float_values(t).astype(np.float64 if t.dtype == "F64" else np.float32)


def unpack_words(words: np.ndarray, bits: int, count: int, what: str) -> np.ndarray:
    """Signed values packed along the last axis of an int32 array.

    Each 32-bit word holds pf = 32 // bits offset-binary fields, value k of a
    word at bit k * bits. The first `count` values along the axis are returned
    as int32; the unused top bits of every word and the fields past `count`
    must be zero.
    """
    per_word = 32 // bits
    u = np.ascontiguousarray(words).view("<u4")
    used = per_word * bits
    if used < 32:
        require(not np.any(u >> np.uint32(used)),
                f"{what}: the unused top {32 - used} bits of a word are not zero")
    shifts = np.arange(per_word, dtype=np.uint32) * np.uint32(bits)
    fields = (u[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    fields = fields.reshape(*u.shape[:-1], u.shape[-1] * per_word)
    require(not np.any(fields[..., count:]),
            f"{what}: padding fields past value {count} of the last word are not zero")
    return fields[..., :count].astype(np.int32) - np.int32(1 << (bits - 1))


# ---------------------------------------------------------------------------
# layouts


@dataclass
class Module:
    """A module stored in a compressed layout: its tensors by name suffix."""

    name: str
    format: str
    parts: dict[str, Tensor]

    def part(self, suffix: str) -> Tensor:
        tensor = self.parts.get(suffix)
        require(tensor is not None, f"{self.name}.{suffix} is missing")
        return tensor


@dataclass(frozen=True)
class WeightArgs:
    """The `weights` quantization arguments of a config group."""

    num_bits: int
    type: str
    symmetric: bool
    strategy: str
    group_size: int | None

    @staticmethod
    def parse(raw: object, where: str) -> WeightArgs:
        require(isinstance(raw, dict), f"{where}.weights is not an object: {raw!r}")
        bits, kind = raw.get("num_bits"), raw.get("type")
        symmetric, strategy = raw.get("symmetric"), raw.get("strategy")
        group_size = raw.get("group_size")
        require(type(bits) is int and 2 <= bits <= 8,
                f"{where}.weights.num_bits is {bits!r}, expected an int in 2..8")
        require(kind in ("int", "float"), f"{where}.weights.type is {kind!r}")
        require(type(symmetric) is bool, f"{where}.weights.symmetric is {symmetric!r}")
        require(strategy in STRATEGIES, f"{where}.weights.strategy is {strategy!r}")
        if strategy == "group":
            require(type(group_size) is int and group_size > 0,
                    f"{where}.weights.group_size is {group_size!r} for strategy group")
        else:
            require(group_size is None,
                    f"{where}.weights.group_size is {group_size!r} for strategy {strategy}")
        return WeightArgs(bits, kind, symmetric, strategy, group_size)

    def groups(self, cols: int) -> int:
        """Scale columns per row: ceil(cols / group_size) for group, else 1."""
        return -(-cols // self.group_size) if self.strategy == "group" else 1

    def scale_shape(self, rows: int, cols: int) -> list[int]:
        return [1] if self.strategy == "tensor" else [rows, self.groups(cols)]

    def per_column(self, values: np.ndarray, rows: int, cols: int) -> np.ndarray:
        """Broadcasts a per-tensor, per-row or per-group parameter to [rows, cols]."""
        if self.strategy == "group":
            return np.repeat(values, self.group_size, axis=1)[:, :cols]
        return np.broadcast_to(values.reshape(-1, 1), (rows, cols))


def classify(sparse: bool, parts: dict[str, Tensor]) -> str:
    """The layout of a module from the tensors it holds (by name suffix)."""
    weight = parts.get("weight")
    if sparse:
        missing = [s for s in SPARSE_SUFFIXES if s not in parts]
        require(not missing, f"sparse-bitmask layout lacks {missing}")
        require(weight is None, "holds a dense weight next to its sparse-bitmask tensors")
        return BITMASK
    if "weight_packed" in parts:
        require("weight_shape" in parts, "holds weight_packed without weight_shape")
        require(weight is None, "holds a dense weight next to weight_packed")
        return PACK
    require("weight_shape" not in parts, "holds weight_shape without weight_packed")
    if weight is not None and weight.dtype == "I8":
        return INT
    if weight is not None and weight.dtype in FP8_TABLES:
        return FLOAT
    raise FormatError("holds weight_scale but neither weight_packed nor an I8 or F8 weight "
                      f"(weight is {'absent' if weight is None else weight.dtype})")


def detect_layouts(tensors: dict[str, Tensor]) -> tuple[dict[str, Module], set[str], list[str]]:
    """Groups stored tensors into compressed modules by the names they hold.

    Returns the well-formed modules, the names of every tensor that belongs to
    a compressed module (well-formed or not), and the failures.
    """
    failures: list[str] = []
    quantized = {n.rpartition(".")[0] for n in tensors if n.endswith(".weight_scale")}
    sparse = {n.rpartition(".")[0] for n in tensors if n.endswith(".bitmask")}
    for name in sorted(tensors):
        module, _, suffix = name.rpartition(".")
        if suffix in QUANT_SUFFIXES and module not in quantized:
            failures.append(f"{name}: stored without {module}.weight_scale")
        if suffix in SPARSE_SUFFIXES and module not in sparse:
            failures.append(f"{name}: stored without {module}.bitmask")

    modules: dict[str, Module] = {}
    consumed: set[str] = set()
    for module in sorted(quantized | sparse):
        suffixes = ((QUANT_SUFFIXES if module in quantized else ())
                    + (SPARSE_SUFFIXES if module in sparse else ()))
        parts = {s: tensors[f"{module}.{s}"] for s in suffixes + ("weight",)
                 if f"{module}.{s}" in tensors}
        consumed.update(f"{module}.{s}" for s in parts)
        try:
            require(not (module in quantized and module in sparse),
                    "holds both quantized and sparse-bitmask tensors")
            modules[module] = Module(module, classify(module in sparse, parts), parts)
        except FormatError as err:
            failures.append(f"{module}: {err}")
    return modules, consumed, failures


# ---------------------------------------------------------------------------
# config


@dataclass
class Plan:
    """What config.json says about the stored modules."""

    # quantized module -> the weight arguments of the config group that targets it
    args: dict[str, WeightArgs]
    # modules sparsity_config targets
    pruned: set[str]


def string_list(value: object, where: str) -> list[str]:
    require(isinstance(value, list) and all(isinstance(v, str) for v in value),
            f"{where} is not a list of names: {value!r}")
    return value


def resolve_targets(targets: list[str], ignore: set[str], linear: set[str],
                    where: str) -> tuple[set[str], bool]:
    """Modules named by `targets`, and whether they were given as ["Linear"].

    ["Linear"] stands for every module with a 2-D weight (`linear`) not in
    `ignore`; any other list names modules exactly.
    """
    if targets == ["Linear"]:
        return linear - ignore, True
    require("Linear" not in targets, f"{where}: 'Linear' mixed with module names: {targets}")
    return set(targets), False


def plan_quantization(qc: dict, modules: dict[str, Module], linear: set[str],
                      failures: list[str]) -> dict[str, WeightArgs]:
    """The weight arguments of every quantized module that its config group matches.

    A module without a matching group is left out and described in `failures`;
    an inconsistency of the config as a whole raises FormatError.
    """
    quantized = {m for m, mod in modules.items() if mod.format in QUANTIZED_FORMATS}
    groups = qc.get("config_groups")
    if groups is None:
        require(not quantized, f"quantization_config has no config_groups but "
                f"{sorted(quantized)[:5]} are stored quantized")
        return {}
    require(isinstance(groups, dict) and groups, "config_groups is not a non-empty object")
    require(qc.get("quantization_status") == "compressed",
            f"quantization_status is {qc.get('quantization_status')!r}, expected 'compressed'")
    ignore = set(string_list(qc.get("ignore") or [], "quantization_config.ignore"))

    explicit: dict[str, str] = {}
    linear_group: str | None = None
    group_args: dict[str, WeightArgs] = {}
    for gname, group in groups.items():
        where = f"config_groups.{gname}"
        require(isinstance(group, dict), f"{where} is not an object")
        require(group.get("format") in QUANTIZED_FORMATS,
                f"{where}.format is {group.get('format')!r}")
        group_args[gname] = WeightArgs.parse(group.get("weights"), where)
        targets = string_list(group.get("targets"), f"{where}.targets")
        named, is_linear = resolve_targets(targets, ignore, linear, where)
        if is_linear:
            require(linear_group is None,
                    f"{where} and config_groups.{linear_group} both target Linear")
            linear_group = gname
            continue
        for module in named:
            require(module not in explicit, f"{module} is targeted by both {where} and "
                    f"config_groups.{explicit.get(module)}")
            explicit[module] = gname
    clash = sorted(ignore & set(explicit))
    require(not clash, f"quantization_config.ignore lists modules a group targets: {clash[:5]}")

    formats = {group["format"] for group in groups.values()}
    want = formats.pop() if len(formats) == 1 else "mixed-precision"
    require(qc.get("format") == want,
            f"quantization_config.format is {qc.get('format')!r}, the groups give {want!r}")

    args: dict[str, WeightArgs] = {}
    for module in sorted(quantized):
        gname = explicit.get(module) or (linear_group if module not in ignore else None)
        if gname is None:
            failures.append(f"{module}: stored quantized but no config group targets it"
                            + (" (it is in ignore)" if module in ignore else ""))
        elif groups[gname]["format"] != modules[module].format:
            failures.append(f"{module}: stored {modules[module].format} but "
                            f"config_groups.{gname}.format is {groups[gname]['format']}")
        else:
            args[module] = group_args[gname]
    unquantized = sorted(set(explicit) - quantized)
    require(not unquantized, f"modules a config group names are not stored quantized: "
            f"{unquantized[:5]}")
    if linear_group is not None:
        left = sorted(linear - ignore - set(explicit) - quantized)
        require(not left, f"config_groups.{linear_group} targets Linear, but these 2-D weights "
                f"are neither quantized nor in ignore: {left[:5]}")
    return args


def plan_sparsity(qc: dict, modules: dict[str, Module], linear: set[str]) -> set[str]:
    """The modules sparsity_config targets; raises on a mismatch with the layouts."""
    sc = qc.get("sparsity_config")
    stored_sparse = {m for m, mod in modules.items() if mod.format == BITMASK}
    if not sc:
        require(not stored_sparse, f"no sparsity_config but {sorted(stored_sparse)[:5]} are "
                "stored sparse-bitmask")
        return set()
    require(isinstance(sc, dict), f"sparsity_config is not an object: {sc!r}")
    fmt = sc.get("format")
    require(fmt in SPARSITY_FORMATS, f"sparsity_config.format is {fmt!r}")
    ignore = set(string_list(sc.get("ignore") or [], "sparsity_config.ignore"))
    targets = string_list(sc.get("targets"), "sparsity_config.targets")
    pruned, _ = resolve_targets(targets, ignore, linear, "sparsity_config.targets")
    absent = sorted(pruned - linear)
    require(not absent, f"sparsity_config targets modules with no 2-D weight: {absent[:5]}")
    untargeted = sorted(stored_sparse - pruned)
    require(not untargeted, f"stored sparse-bitmask but not targeted by sparsity_config: "
            f"{untargeted[:5]}")
    if fmt == DENSE:
        require(not stored_sparse, f"sparsity_config.format is dense but "
                f"{sorted(stored_sparse)[:5]} are stored sparse-bitmask")
    else:
        quantized = {m for m, mod in modules.items() if mod.format in QUANTIZED_FORMATS}
        dense = sorted(pruned - stored_sparse - quantized)
        require(not dense, f"sparsity_config.format is sparse-bitmask but these targeted "
                f"modules are stored dense: {dense[:5]}")
    return pruned


def plan_from_config(config: dict, modules: dict[str, Module], linear: set[str],
                     failures: list[str]) -> Plan:
    """Cross-checks config.json's quantization_config against the stored layouts.

    `linear` holds every module with a 2-D weight, compressed or not. Problems
    with one module go to `failures`; a config inconsistent as a whole raises
    FormatError.
    """
    qc = config.get("quantization_config")
    if qc is None:
        require(not modules, f"config.json has no quantization_config but "
                f"{sorted(modules)[:5]} are stored compressed")
        return Plan({}, set())
    require(isinstance(qc, dict), "quantization_config is not an object")
    require(qc.get("quant_method") == "compressed-tensors",
            f"quantization_config.quant_method is {qc.get('quant_method')!r}")
    args = plan_quantization(qc, modules, linear, failures)
    return Plan(args, plan_sparsity(qc, modules, linear))


# ---------------------------------------------------------------------------
# decoders


def dense_shape(t: Tensor, what: str) -> tuple[int, int]:
    require(t.dtype == "I64" and t.shape == [2], f"{what}: expected I64[2], got {t.dtype}{t.shape}")
    rows, cols = (int(v) for v in t.array())
    require(rows >= 0 and cols >= 0, f"{what}: negative dimension in {[rows, cols]}")
    return rows, cols


def weight_scale(m: Module, args: WeightArgs, rows: int, cols: int) -> np.ndarray:
    """The float32 scales of `m`, after checking their dtype and shape."""
    scale = m.part("weight_scale")
    want = args.scale_shape(rows, cols)
    require(scale.dtype in SCALE_DTYPES and scale.shape == want,
            f"{m.name}.weight_scale: expected F32/F16/BF16{want} for strategy "
            f"{args.strategy}, got {scale.dtype}{scale.shape}")
    values = float_array(scale)
    require(bool(np.all(np.isfinite(values))), f"{m.name}.weight_scale: non-finite values")
    return values


def check_zero_point_presence(m: Module, args: WeightArgs) -> None:
    present = "weight_zero_point" in m.parts
    require(present != args.symmetric,
            f"{m.name}: weight_zero_point is {'present' if present else 'absent'} but the "
            f"config says symmetric={args.symmetric}")


def dequantize(q: np.ndarray, zero: np.ndarray | None, scale: np.ndarray,
               args: WeightArgs) -> np.ndarray:
    """float32(q - zero) * float32(scale), element-wise, in float32."""
    rows, cols = q.shape
    diff = q if zero is None else q - args.per_column(zero, rows, cols)
    return diff.astype(np.float32) * args.per_column(scale, rows, cols)


def decode_pack(m: Module, args: WeightArgs) -> np.ndarray:
    require(args.type == "int", f"{m.name}: pack-quantized needs type int, config says "
            f"{args.type}")
    bits = args.num_bits
    per_word = 32 // bits
    rows, cols = dense_shape(m.part("weight_shape"), f"{m.name}.weight_shape")
    packed = m.part("weight_packed")
    want = [rows, -(-cols // per_word)]
    require(packed.dtype == "I32" and packed.shape == want,
            f"{m.name}.weight_packed: expected I32{want} for {bits} bits, "
            f"got {packed.dtype}{packed.shape}")
    scale = weight_scale(m, args, rows, cols)
    q = unpack_words(packed.array(), bits, cols, f"{m.name}.weight_packed")
    check_zero_point_presence(m, args)
    zero = None
    if not args.symmetric:
        zp = m.part("weight_zero_point")
        groups = args.groups(cols)
        want = [1] if args.strategy == "tensor" else [-(-rows // per_word), groups]
        require(zp.dtype == "I32" and zp.shape == want,
                f"{m.name}.weight_zero_point: expected I32{want}, got {zp.dtype}{zp.shape}")
        if args.strategy == "tensor":
            zero = unpack_words(zp.array().reshape(1, 1), bits, 1, f"{m.name}.weight_zero_point")
        else:
            # Packed along rows: unpack the transpose along its last axis.
            zero = unpack_words(zp.array().T, bits, rows, f"{m.name}.weight_zero_point").T
    return dequantize(q, zero, scale, args)


def quantized_weight(m: Module, dtypes: set[str]) -> tuple[Tensor, int, int]:
    weight = m.part("weight")
    require(weight.dtype in dtypes and len(weight.shape) == 2,
            f"{m.name}.weight: expected a 2-D {'/'.join(sorted(dtypes))} tensor, got "
            f"{weight.dtype}{weight.shape}")
    rows, cols = weight.shape
    return weight, rows, cols


def decode_int(m: Module, args: WeightArgs) -> np.ndarray:
    require(args.type == "int" and args.num_bits == 8,
            f"{m.name}: int-quantized needs 8-bit int, config says {args.num_bits}-bit {args.type}")
    weight, rows, cols = quantized_weight(m, {"I8"})
    scale = weight_scale(m, args, rows, cols)
    check_zero_point_presence(m, args)
    zero = None
    if not args.symmetric:
        zp = m.part("weight_zero_point")
        require(zp.dtype == "I8" and zp.shape == m.parts["weight_scale"].shape,
                f"{m.name}.weight_zero_point: expected I8{m.parts['weight_scale'].shape}, "
                f"got {zp.dtype}{zp.shape}")
        zero = zp.array().astype(np.int32)
    return dequantize(weight.array().astype(np.int32), zero, scale, args)


def decode_float(m: Module, args: WeightArgs) -> np.ndarray:
    require(args.type == "float" and args.num_bits == 8 and args.symmetric,
            f"{m.name}: float-quantized needs symmetric 8-bit float, config says "
            f"{args.num_bits}-bit {args.type} symmetric={args.symmetric}")
    weight, rows, cols = quantized_weight(m, set(FP8_TABLES))
    scale = weight_scale(m, args, rows, cols)
    check_zero_point_presence(m, args)
    values = float_array(weight)
    require(bool(np.all(np.isfinite(values))), f"{m.name}.weight: NaN or infinite fp8 codes")
    return values * args.per_column(scale, rows, cols)


def decode_bitmask(m: Module) -> np.ndarray:
    rows, cols = dense_shape(m.part("shape"), f"{m.name}.shape")
    bitmask, offsets, compressed = m.part("bitmask"), m.part("row_offsets"), m.part("compressed")
    want = [rows, -(-cols // 8)]
    require(bitmask.dtype == "U8" and bitmask.shape == want,
            f"{m.name}.bitmask: expected U8{want}, got {bitmask.dtype}{bitmask.shape}")
    require(offsets.dtype == "I64" and offsets.shape == [rows],
            f"{m.name}.row_offsets: expected I64{[rows]}, got {offsets.dtype}{offsets.shape}")
    require(compressed.dtype in FLOAT_DTYPES and len(compressed.shape) == 1,
            f"{m.name}.compressed: expected a 1-D float tensor, got "
            f"{compressed.dtype}{compressed.shape}")
    bits = np.unpackbits(bitmask.array(), axis=1, bitorder="little")
    require(not np.any(bits[:, cols:]), f"{m.name}.bitmask: padding bits past column {cols} "
            "are set")
    mask = bits[:, :cols].astype(bool)
    counts = mask.sum(axis=1, dtype=np.int64)
    require(int(counts.sum()) == compressed.shape[0],
            f"{m.name}: bitmask has {int(counts.sum())} set bits but compressed holds "
            f"{compressed.shape[0]} values")
    starts = np.cumsum(counts) - counts
    bad = np.flatnonzero(offsets.array() != starts)
    if bad.size:
        r = int(bad[0])
        raise FormatError(f"{m.name}.row_offsets: row {r} starts at {offsets.array()[r]}, "
                          f"the bitmask gives {starts[r]}")
    values = float_array(compressed)
    zeros = int(np.count_nonzero(values == 0))
    require(zeros == 0, f"{m.name}.compressed: {zeros} stored values are zero")
    dense = np.zeros((rows, cols), dtype=values.dtype)
    dense[mask] = values
    return dense


DECODERS = {PACK: decode_pack, INT: decode_int, FLOAT: decode_float}


# ---------------------------------------------------------------------------
# checkpoints


@dataclass
class Decoded:
    """A compressed checkpoint decoded to dense tensors."""

    # float32 (float64 for F64 tensors) for float tensors, the stored dtype otherwise
    tensors: dict[str, np.ndarray]
    # decoded tensor name -> the layout it was stored in (uncompressed for plain tensors)
    formats: dict[str, str]
    # names of the weights config.json's sparsity_config targets
    pruned: set[str]
    # names of the weights that could not be decoded (each has a failure)
    failed: set[str]
    config: dict

    @property
    def quantized(self) -> set[str]:
        return {n for n, f in self.formats.items() if f in QUANTIZED_FORMATS}


def load_checkpoint(path: Path) -> Checkpoint:
    """Loads a checkpoint directory or file; unreadable files are fatal."""
    try:
        return load_input(path)
    except OSError as err:
        raise Fatal(f"{path}: cannot read: {err}") from err


def weight_modules(modules: dict[str, Module], plain: dict[str, Tensor]) -> set[str]:
    """Every module with a 2-D weight: the compressed ones and 2-D float `.weight`s."""
    linear = set(modules)
    linear.update(n[: -len(".weight")] for n, t in plain.items()
                  if n.endswith(".weight") and len(t.shape) == 2 and is_float(t))
    return linear


def decode(out_dir: Path) -> tuple[Decoded, list[str]]:
    """Decodes every tensor of a compressed checkpoint; returns it and the failures."""
    source = load_checkpoint(out_dir)
    failures: list[str] = []
    index = out_dir / INDEX_NAME
    if out_dir.is_dir() and index.is_file():
        listed, stored = set(load_json(index).get("weight_map") or {}), set(source.tensors)
        if listed != stored:
            failures.append(f"{INDEX_NAME}: weight_map lists {sorted(listed - stored)[:5]} not "
                            f"in the shards and omits {sorted(stored - listed)[:5]}")
    config_path = (out_dir if out_dir.is_dir() else out_dir.parent) / "config.json"
    config = load_json(config_path) if config_path.is_file() else {}
    if not config:
        failures.append(f"{config_path} is missing or empty")

    modules, consumed, layout_failures = detect_layouts(source.tensors)
    failures += layout_failures
    failed = {f"{m}.weight" for m in {n.rpartition(".")[0] for n in consumed} - set(modules)}
    plain = {n: t for n, t in source.tensors.items() if n not in consumed}
    try:
        plan = plan_from_config(config, modules, weight_modules(modules, plain), failures)
    except FormatError as err:
        failures.append(f"config.json: {err}")
        plan = None

    tensors: dict[str, np.ndarray] = {}
    formats: dict[str, str] = {}
    for module, mod in sorted(modules.items()):
        name = f"{module}.weight"
        try:
            if mod.format == BITMASK:
                tensors[name] = decode_bitmask(mod)
            elif plan is None or module not in plan.args:
                failed.add(name)  # the config failure is already recorded
                continue
            else:
                tensors[name] = DECODERS[mod.format](mod, plan.args[module])
            formats[name] = mod.format
        except FormatError as err:
            failures.append(str(err))  # the decoders' messages name the tensor
            failed.add(name)
    pruned = {f"{m}.weight" for m in plan.pruned} if plan else set()
    for name, t in plain.items():
        tensors[name] = float_array(t) if is_float(t) else t.array()
        formats[name] = DENSE if name in pruned else UNCOMPRESSED
    return Decoded(tensors, formats, pruned, failed, config), failures


def decode_checkpoint(out_dir: Path | str) -> Decoded:
    """Decodes a compressed checkpoint; raises DecodeError on any failure (Fatal if unreadable)."""
    decoded, failures = decode(Path(out_dir))
    if failures:
        raise DecodeError(failures)
    return decoded


# ---------------------------------------------------------------------------
# comparison with a decompressed checkpoint


def encode(values: np.ndarray, target: str) -> tuple[str, bytes]:
    """The safetensors dtype and bytes of `values` cast to `target` with round to
    nearest even; integer and boolean values keep their dtype."""
    if values.dtype.kind != "f":
        return INTEGER_DTYPES[values.dtype], np.ascontiguousarray(values).tobytes()
    if target == "BF16":
        if values.dtype == np.float64:
            # Round to odd first so that the second rounding gives the single RNE result.
            values = f32_round_to_odd(values)
        return target, bf16_bits_from_f32(values.astype("<f4")).tobytes()
    return target, np.ascontiguousarray(values.astype(DTYPES[target][0])).tobytes()


def describe_difference(want: bytes, got: bytes, size: int) -> str:
    kind = {1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}[size]
    want_bits, got_bits = np.frombuffer(want, kind), np.frombuffer(got, kind)
    bad = np.flatnonzero(want_bits != got_bits)
    i, digits = int(bad[0]), 2 * size
    return (f"{bad.size} of {want_bits.size} elements differ; first at flat index {i}: "
            f"expected bits 0x{int(want_bits[i]):0{digits}x}, got 0x{int(got_bits[i]):0{digits}x}")


def compare(decoded: Decoded, dec: Checkpoint, target: str,
            failures: list[str]) -> list[str]:
    """Compares decoded tensors with the decompressed ones; returns the mismatching names."""
    ours = set(decoded.tensors) | decoded.failed
    missing = sorted(ours - set(dec.tensors))
    extra = sorted(set(dec.tensors) - ours)
    if missing:
        failures.append(f"decompressed checkpoint lacks {len(missing)} tensors: {missing[:10]}")
    if extra:
        failures.append(f"decompressed checkpoint has {len(extra)} tensors the compressed one "
                        f"does not: {extra[:10]}")
    mismatches = []
    for name in sorted(set(decoded.tensors) & set(dec.tensors)):
        values = decoded.tensors[name]
        got = dec.tensors[name]
        dtype, want = encode(values, target)
        if got.dtype != dtype or got.shape != list(values.shape):
            problem = f"expected {dtype}{list(values.shape)}, got {got.dtype}{got.shape}"
        elif got.raw != want:
            problem = describe_difference(want, got.raw, DTYPES[dtype][1])
        else:
            continue
        mismatches.append(name)
        failures.append(f"{name} ({decoded.formats[name]}): {problem}")
    return mismatches


def check_config(decoded: Decoded, dec_dir: Path, torch_dtype: str,
                 failures: list[str]) -> None:
    """The decompressed config is the compressed one without quantization_config and
    with torch_dtype set to the target."""
    path = dec_dir / "config.json"
    if not path.is_file():
        failures.append(f"{path} is missing")
        return
    got = load_json(path)
    for key in ("quantization_config", "sparsity_config"):
        if key in got:
            failures.append(f"decompressed config.json still holds {key}")
    want = {k: v for k, v in decoded.config.items()
            if k not in ("quantization_config", "sparsity_config")}
    want["torch_dtype"] = torch_dtype
    absent = object()
    for key in sorted(set(want) | (set(got) - {"quantization_config", "sparsity_config"})):
        if want.get(key, absent) != got.get(key, absent):
            failures.append(f"decompressed config.json: {key} is {got.get(key, '<absent>')!r}, "
                            f"expected {want.get(key, '<absent>')!r}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, type=Path,
                        help="the directory shardpress compress wrote")
    parser.add_argument("--decompressed", required=True, type=Path,
                        help="the directory shardpress decompress wrote from it")
    parser.add_argument("--dtype", required=True, choices=sorted(TARGETS))
    args = parser.parse_args(argv)
    for path in (args.output, args.decompressed):
        if not path.is_dir():
            parser.error(f"{path} is not a directory")
    target, torch_dtype = TARGETS[args.dtype]
    try:
        decoded, failures = decode(args.output)
        dec = load_checkpoint(args.decompressed)
        check_config(decoded, args.decompressed, torch_dtype, failures)
        mismatches = compare(decoded, dec, target, failures)
    except Fatal as err:
        print(json.dumps({"ok": False, "failures": [str(err)]}, indent=2))
        print(f"decode_output: FAILED: {err}", file=sys.stderr)
        return 1
    summary = {
        "ok": not failures,
        "tensors": len(decoded.tensors),
        "by_format": dict(sorted(Counter(decoded.formats.values()).items())),
        "pruned": len(decoded.pruned),
        "mismatches": mismatches,
    }
    print(json.dumps(summary, indent=2))
    if failures:
        print(f"decode_output: FAILED ({len(failures)} failures, {args.output}):", file=sys.stderr)
        for failure in failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    print(f"decode_output: OK, {len(decoded.tensors)} tensors match bit for bit ({args.dtype})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
