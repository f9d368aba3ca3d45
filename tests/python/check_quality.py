#!/usr/bin/env python3
"""Quality checks of a compressed checkpoint against the checkpoint it came from.

OUT_DIR is decoded with decode_output.decode_checkpoint. For every 2-D weight
the output stores quantized or its sparsity_config marks as pruned, the
relative Frobenius error ||w - w'|| / ||w|| of the decoded tensor w' against
the input w is measured, and the expectations given with --expect (a JSON
object, every key optional) are checked:

  mean_rel_max       the mean relative error over those tensors is at most this
  max_rel_max        every relative error is at most this
  sparsity           s: every pruned tensor stored unquantized has exactly the
                     expected number of zeros, sparsity_rounding(s * numel)
  sparsity_rounding  "floor" (default), "ceil", or "round" (halves away from zero)
  nm                 [n, m]: in every run of m columns (0..m-1, m..2m-1, ...) of
                     a row of a pruned tensor at most n decoded values are
                     non-zero, all where the input has one of the n largest
                     magnitudes of that run (ties allowed); sparsity_config's
                     sparsity_structure must be "n:m"
  zeros_preserved    true: every pruned tensor, quantized ones included, decodes
                     to at least the expected number of exact zeros (from
                     sparsity, or m - n per run of m from nm)

With --compare-mse OTHER_OUT_DIR (a second output of the same input, e.g. with
the minmax observer), every quantized tensor must have a strictly smaller
error in OUT_DIR than in OTHER_OUT_DIR.

Usage:
  check_quality.py --input MODEL_DIR --output OUT_DIR --expect JSON
                   [--compare-mse OTHER_OUT_DIR]

A JSON summary is printed on stdout. Every failure is printed on stderr and the
exit status is 1; a usage error exits with 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from decode_output import (
    Decoded,
    DecodeError,
    decode_checkpoint,
    float_array,
    is_float,
    load_checkpoint,
)
from verify_output import Fatal, Tensor, error_stats

ROUNDINGS = ("floor", "ceil", "round")


class UsageError(Exception):
    """An --expect value that cannot be used."""


@dataclass(frozen=True)
class Expectation:
    """The --expect object (its keys are described in the module docstring)."""

    mean_rel_max: float | None = None
    max_rel_max: float | None = None
    sparsity: float | None = None
    sparsity_rounding: str = "floor"
    nm: tuple[int, int] | None = None
    zeros_preserved: bool = False

    @staticmethod
    def parse(text: str) -> Expectation:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"--expect is not JSON: {err}") from err
        if not isinstance(raw, dict):
            raise UsageError("--expect is not a JSON object")
        unknown = sorted(set(raw) - set(Expectation.__dataclass_fields__))
        if unknown:
            raise UsageError(f"--expect has unknown keys {unknown}")

        def number(key: str, low: float, high: float) -> float | None:
            value = raw.get(key)
            if value is not None and (type(value) not in (int, float)
                                      or not low <= value <= high):
                raise UsageError(f"--expect {key} is {value!r}, expected a number in "
                                 f"[{low}, {high}]")
            return value

        rounding = raw.get("sparsity_rounding", "floor")
        if rounding not in ROUNDINGS:
            raise UsageError(f"--expect sparsity_rounding is {rounding!r}, expected one of "
                             f"{list(ROUNDINGS)}")
        nm = raw.get("nm")
        if nm is not None and not (isinstance(nm, list) and len(nm) == 2
                                   and all(type(v) is int for v in nm) and 1 <= nm[0] < nm[1]):
            raise UsageError(f"--expect nm is {nm!r}, expected [n, m] with 1 <= n < m")
        zeros_preserved = raw.get("zeros_preserved", False)
        if type(zeros_preserved) is not bool:
            raise UsageError(f"--expect zeros_preserved is {zeros_preserved!r}")
        expectation = Expectation(number("mean_rel_max", 0, math.inf),
                                  number("max_rel_max", 0, math.inf),
                                  number("sparsity", 0, 1), rounding,
                                  tuple(nm) if nm else None, zeros_preserved)
        if zeros_preserved and expectation.sparsity is None and expectation.nm is None:
            raise UsageError("--expect zeros_preserved needs sparsity or nm")
        return expectation

    def expected_zeros(self, shape: tuple[int, int]) -> int | None:
        """Zeros a pruned tensor of this shape should hold, if the expectation says."""
        if self.sparsity is not None:
            exact = self.sparsity * (shape[0] * shape[1])
            if self.sparsity_rounding == "floor":
                return math.floor(exact)
            if self.sparsity_rounding == "ceil":
                return math.ceil(exact)
            whole = math.floor(exact)
            return whole + (1 if exact - whole >= 0.5 else 0)
        if self.nm is not None:
            n, m = self.nm
            rows, cols = shape
            ragged = cols % m
            return rows * ((cols // m) * (m - n) + max(0, ragged - n))
        return None


def nm_violation(original: np.ndarray, decoded: np.ndarray, n: int, m: int) -> str | None:
    """Describes the first run of m columns breaking the n:m rule, or None."""
    rows, cols = original.shape
    pad = ((0, 0), (0, -cols % m))
    # Padding columns get magnitude -1 (below any real one) and count as zero.
    magnitude = np.pad(np.abs(original), pad, constant_values=-1.0).reshape(rows, -1, m)
    kept = np.pad(decoded != 0, pad).reshape(rows, -1, m)
    counts = kept.sum(axis=-1)
    over = np.argwhere(counts > n)
    if over.size:
        r, g = over[0]
        return (f"{len(over)} runs of {m} columns hold more than {n} non-zeros; first row {r}, "
                f"columns {g * m}..{g * m + m - 1} hold {counts[r, g]}")
    nth_largest = -np.sort(-magnitude, axis=-1)[..., n - 1]
    wrong = np.argwhere(kept & (magnitude < nth_largest[..., None]))
    if wrong.size:
        r, g, k = wrong[0]
        return (f"{len(wrong)} kept values are not among the {n} largest magnitudes of their "
                f"run; first row {r}, column {g * m + k}: |w| = {magnitude[r, g, k]:.6g} < "
                f"{nth_largest[r, g]:.6g}")
    return None


def original_weight(source: dict[str, Tensor], name: str, shape: tuple[int, ...],
                    failures: list[str]) -> np.ndarray | None:
    t = source.get(name)
    if t is None or not is_float(t) or len(t.shape) != 2:
        failures.append(f"{name}: compressed in the output but the input has no 2-D float "
                        f"tensor of that name")
        return None
    if tuple(t.shape) != shape:
        failures.append(f"{name}: input shape {t.shape}, decoded shape {list(shape)}")
        return None
    return float_array(t)


def check_tensor(name: str, original: np.ndarray, decoded: Decoded, expect: Expectation,
                 failures: list[str]) -> dict:
    """Error and pruning statistics of one tensor, with its expectation failures."""
    values = decoded.tensors[name]
    stats = error_stats(original, values)
    entry = {"format": decoded.formats[name], "pruned": name in decoded.pruned, **stats}
    if name not in decoded.pruned:
        return entry
    quantized = name in decoded.quantized
    zeros = int(np.count_nonzero(values == 0))
    expected = expect.expected_zeros(values.shape)
    entry.update(numel=int(values.size), zeros=zeros, expected_zeros=expected)
    if expect.sparsity is not None and not quantized and zeros != expected:
        failures.append(f"{name}: {zeros} zeros of {values.size}, expected {expected} "
                        f"({expect.sparsity_rounding}({expect.sparsity} * {values.size}))")
    if expect.zeros_preserved and zeros < expected:
        failures.append(f"{name}: decodes to {zeros} zeros, fewer than the {expected} pruned "
                        "positions")
    if expect.nm is not None:
        problem = nm_violation(original, values, *expect.nm)
        if problem:
            failures.append(f"{name}: {expect.nm[0]}:{expect.nm[1]}: {problem}")
    return entry


def evaluate(input_path: Path, output: Path, expect: Expectation,
             other: Path | None) -> tuple[dict, list[str]]:
    failures: list[str] = []
    source = load_checkpoint(input_path).tensors
    decoded = decode_checkpoint(output)
    names = sorted(decoded.quantized | decoded.pruned)
    if not names:
        failures.append(f"{output}: no tensor is stored quantized or marked as pruned")
    pruning_expected = expect.sparsity is not None or expect.nm is not None
    if pruning_expected and not decoded.pruned:
        failures.append(f"{output}: the expectation describes pruning but sparsity_config "
                        "marks no tensor as pruned")
    if expect.nm is not None:
        sparsity_config = (decoded.config.get("quantization_config") or {}).get(
            "sparsity_config") or {}
        structure = sparsity_config.get("sparsity_structure")
        want = f"{expect.nm[0]}:{expect.nm[1]}"
        if structure != want:
            failures.append(f"sparsity_config.sparsity_structure is {structure!r}, "
                            f"expected {want!r}")

    originals: dict[str, np.ndarray] = {}
    tensors: dict[str, dict] = {}
    for name in names:
        original = original_weight(source, name, decoded.tensors[name].shape, failures)
        if original is not None:
            originals[name] = original
            tensors[name] = check_tensor(name, original, decoded, expect, failures)

    rels = {name: entry["rel_error"] for name, entry in tensors.items()}
    mean_rel = float(np.mean(list(rels.values()))) if rels else 0.0
    max_rel = max(rels.values(), default=0.0)
    worst = max(rels, key=rels.get, default=None)
    if expect.mean_rel_max is not None and mean_rel > expect.mean_rel_max:
        failures.append(f"mean relative error {mean_rel:.6f} exceeds {expect.mean_rel_max}")
    if expect.max_rel_max is not None and max_rel > expect.max_rel_max:
        failures.append(f"max relative error {max_rel:.6f} ({worst}) exceeds "
                        f"{expect.max_rel_max}")

    comparison = (compare_errors(decoded, originals, other, tensors, failures)
                  if other is not None else None)
    summary = {
        "ok": not failures,
        "tensors": tensors,
        "quantized": len(decoded.quantized),
        "pruned": len(decoded.pruned),
        "mean_rel_error": mean_rel,
        "max_rel_error": max_rel,
        "worst_tensor": worst,
        "compare_mse": comparison,
    }
    return summary, failures


def compare_errors(decoded: Decoded, originals: dict[str, np.ndarray], other_dir: Path,
                   tensors: dict[str, dict], failures: list[str]) -> dict:
    """Checks that each quantized tensor's error is below its error in `other_dir`."""
    other = decode_checkpoint(other_dir)
    if other.quantized != decoded.quantized:
        failures.append(f"{other_dir} quantizes other tensors: only there "
                        f"{sorted(other.quantized - decoded.quantized)[:5]}, only here "
                        f"{sorted(decoded.quantized - other.quantized)[:5]}")
    not_better = []
    for name in sorted(decoded.quantized & other.quantized & set(originals)):
        other_rel = error_stats(originals[name], other.tensors[name])["rel_error"]
        tensors[name]["other_rel_error"] = other_rel
        if not tensors[name]["rel_error"] < other_rel:
            not_better.append(name)
            failures.append(f"{name}: relative error {tensors[name]['rel_error']:.6g} is not "
                            f"below {other_rel:.6g} in {other_dir}")
    compared = [n for n in tensors if "other_rel_error" in tensors[n]]
    return {"other": str(other_dir), "compared": len(compared),
            "better": len(compared) - len(not_better), "not_better": not_better}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, type=Path,
                        help="the checkpoint given to shardpress compress")
    parser.add_argument("--output", required=True, type=Path,
                        help="the directory shardpress compress wrote")
    parser.add_argument("--expect", required=True,
                        help='JSON object, e.g. {"mean_rel_max": 0.13, "sparsity": 0.5}')
    parser.add_argument("--compare-mse", type=Path, metavar="OTHER_OUT_DIR",
                        help="an output whose every quantized tensor must have a larger error")
    args = parser.parse_args(argv)
    try:
        expect = Expectation.parse(args.expect)
    except UsageError as err:
        parser.error(str(err))
    for path in (args.output, args.compare_mse):
        if path is not None and not path.is_dir():
            parser.error(f"{path} is not a directory")
    if not args.input.exists():
        parser.error(f"{args.input} does not exist")
    try:
        summary, failures = evaluate(args.input, args.output, expect, args.compare_mse)
    except (Fatal, DecodeError) as err:
        failures = err.failures if isinstance(err, DecodeError) else [str(err)]
        summary = {"ok": False, "failures": failures}
    print(json.dumps(summary, indent=2))
    if failures:
        print(f"check_quality: FAILED ({len(failures)} failures, {args.output}):",
              file=sys.stderr)
        for failure in failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    print(f"check_quality: OK, {len(summary['tensors'])} tensors, mean relative error "
          f"{summary['mean_rel_error']:.6f}, max {summary['max_rel_error']:.6f}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
