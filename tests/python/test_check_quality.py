"""Tests of check_quality.py on small hand-built checkpoints.

Run from tests/python with `python -m unittest`.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import unittest
from pathlib import Path

import numpy as np

import check_quality as cq
from checkpoint_fixtures import tensor, write_checkpoint
from verify_output import Tensor

A = "model.layers.0.mlp.up_proj"
B = "model.layers.0.mlp.down_proj"
EMBED = "model.embed_tokens"


def keep_largest(w: np.ndarray, n: int, m: int) -> np.ndarray:
    """w with all but the n largest magnitudes of every run of m columns set to zero."""
    runs = w.reshape(w.shape[0], -1, m)
    order = np.argsort(-np.abs(runs), axis=-1, kind="stable")
    keep = np.zeros(runs.shape, bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return np.where(keep, runs, 0).reshape(w.shape)


def bitmask_layout(module: str, dense: np.ndarray) -> dict[str, Tensor]:
    mask = dense != 0
    counts = mask.sum(axis=1)
    return {f"{module}.shape": tensor("I64", list(dense.shape)),
            f"{module}.compressed": tensor("F32", dense[mask]),
            f"{module}.bitmask": tensor("U8", np.packbits(mask, axis=1, bitorder="little")),
            f"{module}.row_offsets": tensor("I64", np.cumsum(counts) - counts)}


def int8_layout(module: str, w: np.ndarray, widen: float = 1.0,
                zero: int | None = None) -> dict[str, Tensor]:
    """Per-row int8 quantization with scale max|w| / 127 * widen; with `zero`, an
    asymmetric layout whose every zero point is `zero` (stored q unchanged)."""
    scale = (np.abs(w).max(axis=1, keepdims=True) / 127 * widen).astype(np.float32)
    q = np.clip(np.round(w / scale), -128, 127).astype(np.int8)
    parts = {f"{module}.weight": tensor("I8", q), f"{module}.weight_scale": tensor("F32", scale)}
    if zero is not None:
        parts[f"{module}.weight_zero_point"] = tensor("I8", np.full(scale.shape, zero))
    return parts


def config(sparsity: dict, symmetric: bool = True, quantized: list[str] = (B,)) -> dict:
    return {"hidden_size": 8, "quantization_config": {
        "quant_method": "compressed-tensors", "version": "0", "format": "int-quantized",
        "quantization_status": "compressed", "ignore": [],
        "config_groups": {"group_0": {
            "targets": list(quantized), "format": "int-quantized",
            "weights": {"num_bits": 8, "type": "int", "symmetric": symmetric,
                        "strategy": "channel", "group_size": None}}},
        "sparsity_config": sparsity}}


def sparsity(fmt: str, structure: str, targets: list[str]) -> dict:
    return {"format": fmt, "global_sparsity": 0.5, "sparsity_structure": structure,
            "targets": targets, "ignore": [], "registry_requires_subclass": False}


class Helpers(unittest.TestCase):
    def test_expected_zeros_rounding(self) -> None:
        parse = cq.Expectation.parse
        self.assertEqual(parse('{"sparsity": 0.5}').expected_zeros((3, 5)), 7)
        self.assertEqual(parse('{"sparsity": 0.5, "sparsity_rounding": "ceil"}')
                         .expected_zeros((3, 5)), 8)
        self.assertEqual(parse('{"sparsity": 0.5, "sparsity_rounding": "round"}')
                         .expected_zeros((3, 5)), 8)
        self.assertEqual(parse('{"sparsity": 0.3, "sparsity_rounding": "round"}')
                         .expected_zeros((1, 5)), 2)
        # 2:4 over 10 columns: two full runs (2 zeros each) and a run of 2 (none).
        self.assertEqual(parse('{"nm": [2, 4]}').expected_zeros((3, 10)), 12)
        self.assertEqual(parse('{"nm": [1, 4]}').expected_zeros((1, 11)), 3 + 3 + 2)

    def test_bad_expectations(self) -> None:
        for text in ('{"sparsity": 1.5}', '{"nm": [4, 2]}', '{"typo": 1}', '[1]',
                     '{"zeros_preserved": true}', '{"sparsity_rounding": "up"}'):
            with self.assertRaises(cq.UsageError, msg=text):
                cq.Expectation.parse(text)

    def test_nm_violation(self) -> None:
        w = np.array([[4.0, -3.0, 2.0, 1.0, 5.0, 5.0, 5.0, 0.5]])
        self.assertIsNone(cq.nm_violation(w, np.array([[4, -3, 0, 0, 5, 0, 5, 0]]), 2, 4))
        self.assertIn("more than 2 non-zeros",
                      cq.nm_violation(w, np.array([[4, -3, 2, 0, 0, 0, 0, 0]]), 2, 4))
        self.assertIn("first row 0, column 2",
                      cq.nm_violation(w, np.array([[4, 0, 2, 0, 0, 0, 0, 0]]), 2, 4))
        # Ragged last run of 2 columns may keep both.
        w = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
        self.assertIsNone(cq.nm_violation(w, np.array([[0, 0, 3, 4, 5, 6]]), 2, 4))


class Checkpoints(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.root = Path(self.tmp.name)
        rng = np.random.default_rng(7)
        self.a = rng.standard_normal((4, 8)).astype(np.float32)
        self.b = rng.standard_normal((3, 6)).astype(np.float32)
        self.embed = rng.standard_normal((5, 8)).astype(np.float32)
        write_checkpoint(self.root / "in", [{f"{A}.weight": tensor("F32", self.a),
                                             f"{B}.weight": tensor("F32", self.b),
                                             f"{EMBED}.weight": tensor("F32", self.embed)}],
                         {"hidden_size": 8})

    def tearDown(self) -> None:
        self.tmp.cleanup()

    def write_out(self, name: str, shard: dict[str, Tensor], cfg: dict) -> Path:
        shard = {**shard, f"{EMBED}.weight": tensor("F32", self.embed)}
        write_checkpoint(self.root / name, [shard], cfg)
        return self.root / name

    def two_four(self, pruned_a: np.ndarray, b_widen: float = 1.0, name: str = "out") -> Path:
        layouts = {**bitmask_layout(A, pruned_a), **int8_layout(B, self.b, b_widen)}
        return self.write_out(name, layouts, config(sparsity("sparse-bitmask", "2:4", [A])))

    def run_main(self, out: Path, expect: dict, *extra: str) -> tuple[int, dict, str]:
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cq.main(["--input", str(self.root / "in"), "--output", str(out),
                            "--expect", json.dumps(expect), *extra])
        return code, json.loads(stdout.getvalue()), stderr.getvalue()

    def test_two_four_pruning_passes(self) -> None:
        expect = {"nm": [2, 4], "sparsity": 0.5, "zeros_preserved": True,
                  "mean_rel_max": 0.6, "max_rel_max": 0.7}
        code, summary, stderr = self.run_main(self.two_four(keep_largest(self.a, 2, 4)), expect)
        self.assertEqual(code, 0, stderr)
        self.assertEqual(sorted(summary["tensors"]), [f"{B}.weight", f"{A}.weight"])
        a = summary["tensors"][f"{A}.weight"]
        self.assertEqual((a["format"], a["pruned"], a["zeros"], a["expected_zeros"]),
                         ("sparse-bitmask", True, 16, 16))
        self.assertLess(summary["tensors"][f"{B}.weight"]["rel_error"], 0.01)
        self.assertFalse(summary["tensors"][f"{B}.weight"]["pruned"])

    def test_wrong_kept_values_fail(self) -> None:
        pruned = keep_largest(self.a, 2, 4)
        pruned[0, :4] = self.a[0, :4] - keep_largest(self.a, 2, 4)[0, :4]  # the 2 smallest
        code, _, stderr = self.run_main(self.two_four(pruned), {"nm": [2, 4]})
        self.assertEqual(code, 1)
        self.assertIn("not among the 2 largest magnitudes", stderr)

    def test_too_many_kept_values_fail(self) -> None:
        pruned = keep_largest(self.a, 2, 4)
        pruned[1, 4:] = self.a[1, 4:]
        code, summary, stderr = self.run_main(self.two_four(pruned),
                                              {"nm": [2, 4], "sparsity": 0.5})
        self.assertEqual(code, 1)
        self.assertIn("more than 2 non-zeros", stderr)
        self.assertIn("14 zeros of 32, expected 16", stderr)
        self.assertFalse(summary["ok"])

    def test_structure_must_match_config(self) -> None:
        out = self.write_out("out", {**bitmask_layout(A, keep_largest(self.a, 2, 4))},
                             {"quantization_config": {
                                 "quant_method": "compressed-tensors",
                                 "sparsity_config": sparsity("sparse-bitmask", "unstructured",
                                                             [A])}})
        code, _, stderr = self.run_main(out, {"nm": [2, 4]})
        self.assertEqual(code, 1)
        self.assertIn("sparsity_structure is 'unstructured', expected '2:4'", stderr)

    def test_error_bounds(self) -> None:
        out = self.two_four(keep_largest(self.a, 2, 4))
        code, summary, stderr = self.run_main(out, {"mean_rel_max": 0.01, "max_rel_max": 0.02})
        self.assertEqual(code, 1)
        self.assertIn("mean relative error", stderr)
        self.assertIn(f"({A}.weight) exceeds 0.02", stderr)
        self.assertEqual(summary["worst_tensor"], f"{A}.weight")

    def unstructured(self, zero: int | None) -> Path:
        """A pruned to its 16 largest magnitudes, then int8-quantized; B left unquantized."""
        threshold = np.sort(np.abs(self.a).ravel())[16]
        pruned = np.where(np.abs(self.a) >= threshold, self.a, 0)
        cfg = config(sparsity("dense", "unstructured", ["Linear"]), symmetric=zero is None,
                     quantized=[A])
        cfg["quantization_config"]["ignore"] = [B, EMBED]
        cfg["quantization_config"]["sparsity_config"]["ignore"] = [B, EMBED]
        return self.write_out("out", {**int8_layout(A, pruned, zero=zero),
                                      f"{B}.weight": tensor("F32", self.b)}, cfg)

    def test_quantized_pruned_zeros_preserved(self) -> None:
        expect = {"sparsity": 0.5, "zeros_preserved": True}
        code, summary, stderr = self.run_main(self.unstructured(None), expect)
        self.assertEqual(code, 0, stderr)
        entry = summary["tensors"][f"{A}.weight"]
        self.assertEqual((entry["format"], entry["pruned"]), ("int-quantized", True))
        self.assertGreaterEqual(entry["zeros"], 16)
        self.assertEqual(list(summary["tensors"]), [f"{A}.weight"])

    def test_shifted_zero_points_lose_the_zeros(self) -> None:
        expect = {"sparsity": 0.5, "zeros_preserved": True}
        code, _, stderr = self.run_main(self.unstructured(3), expect)
        self.assertEqual(code, 1)
        self.assertIn("fewer than the 16 pruned positions", stderr)

    def test_compare_mse(self) -> None:
        good = self.two_four(keep_largest(self.a, 2, 4), name="good")
        worse = self.two_four(keep_largest(self.a, 2, 4), b_widen=1.37, name="worse")
        code, summary, stderr = self.run_main(good, {}, "--compare-mse", str(worse))
        self.assertEqual(code, 0, stderr)
        self.assertEqual(summary["compare_mse"]["better"], 1)
        self.assertIn("other_rel_error", summary["tensors"][f"{B}.weight"])
        code, summary, stderr = self.run_main(worse, {}, "--compare-mse", str(good))
        self.assertEqual(code, 1)
        self.assertEqual(summary["compare_mse"]["not_better"], [f"{B}.weight"])

    def test_usage_errors_exit_2(self) -> None:
        with contextlib.redirect_stderr(io.StringIO()), self.assertRaises(SystemExit) as raised:
            cq.main(["--input", str(self.root / "in"), "--output", str(self.root),
                     "--expect", '{"unknown": 1}'])
        self.assertEqual(raised.exception.code, 2)


if __name__ == "__main__":
    unittest.main()
