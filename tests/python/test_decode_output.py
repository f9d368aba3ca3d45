"""Unit tests of decode_output.py against hand-computed layouts.

Run from tests/python with `python -m unittest`.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import tempfile
import unittest
from pathlib import Path

import numpy as np

import decode_output as d
from checkpoint_fixtures import bf16, tensor, write_checkpoint
from verify_output import Tensor

INT32_WRAP = 1 << 32


def words(values: list[int]) -> list[int]:
    """Unsigned 32-bit words written as int32 (the stored dtype)."""
    return [w - INT32_WRAP if w >= 1 << 31 else w for w in values]


def pack_reference(u: list[int], bits: int) -> list[int]:
    """Packs offset-binary values one at a time, the slow and obvious way."""
    per_word = 32 // bits
    out = []
    for start in range(0, len(u), per_word):
        word = 0
        for k, value in enumerate(u[start:start + per_word]):
            word |= value << (k * bits)
        out.append(word)
    return words(out)


def module(fmt: str, **parts: Tensor) -> d.Module:
    return d.Module("m", fmt, parts)


def args(bits: int = 4, kind: str = "int", symmetric: bool = True, strategy: str = "tensor",
         group_size: int | None = None) -> d.WeightArgs:
    return d.WeightArgs(bits, kind, symmetric, strategy, group_size)


class Fp8Tables(unittest.TestCase):
    def test_e4m3_values(self) -> None:
        table = d.FP8_TABLES["F8_E4M3"]
        self.assertEqual(table[0x7E], 448.0)  # 0.1111.110: 1.75 * 2**8
        self.assertEqual(table[0xFE], -448.0)
        self.assertEqual(table[0x08], 2.0 ** -6)  # smallest normal
        self.assertEqual(table[0x01], 2.0 ** -9)  # smallest subnormal: 1/8 * 2**-6
        self.assertEqual(table[0x07], 7 / 8 * 2.0 ** -6)
        self.assertEqual(table[0x38], 1.0)
        self.assertEqual(table[0x3C], 1.5)
        self.assertEqual(table[0x78], 256.0)  # 0.1111.000 is a normal number in the fn variant
        self.assertTrue(np.isnan(table[0x7F]) and np.isnan(table[0xFF]))
        self.assertEqual(int(np.isnan(table).sum()), 2)
        self.assertFalse(np.any(np.isinf(table)))
        self.assertEqual(table[0x80], 0.0)
        self.assertTrue(np.signbit(table[0x80]))
        self.assertEqual(table.dtype, np.float32)

    def test_e5m2_values(self) -> None:
        table = d.FP8_TABLES["F8_E5M2"]
        self.assertEqual(table[0x3C], 1.0)
        self.assertEqual(table[0x7B], 57344.0)  # 1.75 * 2**15, the largest finite value
        self.assertEqual(table[0x04], 2.0 ** -14)
        self.assertEqual(table[0x01], 2.0 ** -16)  # 1/4 * 2**-14
        self.assertEqual(table[0x7C], np.inf)
        self.assertEqual(table[0xFC], -np.inf)
        self.assertTrue(all(np.isnan(table[c]) for c in (0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF)))
        self.assertEqual(int(np.isnan(table).sum()), 6)


class PackQuantized(unittest.TestCase):
    def test_three_bits_thirteen_values(self) -> None:
        # pf = 10: values 0..9 in word 0, 10..12 in word 1. Offset binary u = q + 4
        # is one octal digit per value, so the words read as octal numbers.
        q = [-4, -3, -2, -1, 0, 1, 2, 3, -4, 3, 0, 1, -1]
        packed = [0o7076543210, 0o354]
        self.assertEqual(pack_reference([v + 4 for v in q], 3), packed)
        m = module(d.PACK, weight_packed=tensor("I32", [packed]),
                   weight_shape=tensor("I64", [1, 13]), weight_scale=tensor("F32", [0.5]))
        w = d.decode_pack(m, args(bits=3))
        self.assertEqual(w.dtype, np.float32)
        np.testing.assert_array_equal(w, np.array([q], dtype=np.float32) * 0.5)

    def test_unused_top_bits_must_be_zero(self) -> None:
        m = module(d.PACK, weight_packed=tensor("I32", [words([0o7076543210 | 1 << 30, 0o354])]),
                   weight_shape=tensor("I64", [1, 13]), weight_scale=tensor("F32", [1.0]))
        with self.assertRaisesRegex(d.FormatError, "top 2 bits"):
            d.decode_pack(m, args(bits=3))

    def test_padding_slots_must_be_zero(self) -> None:
        # Value 13 (the 4th slot of word 1) is padding.
        m = module(d.PACK, weight_packed=tensor("I32", [[0o7076543210, 0o1354]]),
                   weight_shape=tensor("I64", [1, 13]), weight_scale=tensor("F32", [1.0]))
        with self.assertRaisesRegex(d.FormatError, "padding"):
            d.decode_pack(m, args(bits=3))

    def test_eight_bits_with_the_sign_bit_of_the_word_set(self) -> None:
        # u = 0x00, 0x80, 0xFF, 0x80 -> q = -128, 0, 127, 0; word 0x80FF8000 is negative as I32.
        m = module(d.PACK, weight_packed=tensor("I32", [words([0x80FF8000])]),
                   weight_shape=tensor("I64", [1, 4]), weight_scale=tensor("F32", [[2.0]]))
        w = d.decode_pack(m, args(bits=8, strategy="channel"))
        np.testing.assert_array_equal(w, [[-256.0, 0.0, 254.0, 0.0]])

    def test_four_bits_reads_as_hex_digits(self) -> None:
        # u = 1..8, 9 -> q = u - 8; two rows, channel scales in BF16 (0x3F00 = 0.5, 0x4000 = 2).
        m = module(d.PACK, weight_packed=tensor("I32", [words([0x87654321, 0x9]), [0x0, 0xF]]),
                   weight_shape=tensor("I64", [2, 9]),
                   weight_scale=tensor("BF16", [[0x3F00], [0x4000]]))
        w = d.decode_pack(m, args(bits=4, strategy="channel"))
        np.testing.assert_array_equal(w[0], (np.arange(1, 10) - 8) * 0.5)
        np.testing.assert_array_equal(w[1], [-16.0] * 8 + [14.0])

    def test_round_trip_every_width(self) -> None:
        rng = np.random.default_rng(1)
        for bits in range(2, 9):
            rows, cols, group = 3, 23, 5
            q = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=(rows, cols))
            packed = [pack_reference([int(v) + (1 << (bits - 1)) for v in row], bits) for row in q]
            scale = rng.uniform(0.01, 1.0, size=(rows, 5)).astype(np.float32)
            m = module(d.PACK, weight_packed=tensor("I32", packed),
                       weight_shape=tensor("I64", [rows, cols]), weight_scale=tensor("F32", scale))
            w = d.decode_pack(m, args(bits=bits, strategy="group", group_size=group))
            for r in range(rows):
                for c in range(cols):
                    self.assertEqual(w[r, c], np.float32(q[r, c]) * scale[r, c // group],
                                     f"bits={bits} r={r} c={c}")

    def test_zero_points_packed_along_rows(self) -> None:
        # 4 bits, 10 rows, 2 groups of 2 columns. z[r, 0] = r - 8 (u = r),
        # z[r, 1] = 7 - r (u = 15 - r). Word (i, g) holds rows 8i..8i+7 of group g.
        zp = [words([0x76543210, 0x89ABCDEF]), [0x98, 0x67]]
        z = np.array([[r - 8, 7 - r] for r in range(10)])
        q = np.tile(np.array([-8, 7, 0, 1]), (10, 1))
        packed = [pack_reference([int(v) + 8 for v in row], 4) for row in q]
        scale = np.full((10, 2), 0.25, dtype=np.float32)
        m = module(d.PACK, weight_packed=tensor("I32", packed),
                   weight_shape=tensor("I64", [10, 4]), weight_scale=tensor("F32", scale),
                   weight_zero_point=tensor("I32", zp))
        w = d.decode_pack(m, args(bits=4, symmetric=False, strategy="group", group_size=2))
        want = (q - np.repeat(z, 2, axis=1)).astype(np.float32) * np.float32(0.25)
        np.testing.assert_array_equal(w, want)
        self.assertEqual(w[9, 0], (-8 - 1) * 0.25)  # row 9: z = 1 in group 0
        self.assertEqual(w[9, 3], (1 + 2) * 0.25)  # row 9: z = -2 in group 1

    def test_tensor_zero_point_is_one_word(self) -> None:
        m = module(d.PACK, weight_packed=tensor("I32", [[0x98]]),
                   weight_shape=tensor("I64", [1, 2]), weight_scale=tensor("F32", [0.5]),
                   weight_zero_point=tensor("I32", [5]))  # u = 5 -> z = -3
        w = d.decode_pack(m, args(bits=4, symmetric=False))
        np.testing.assert_array_equal(w, [[(0 + 3) * 0.5, (1 + 3) * 0.5]])

    def test_zero_point_padding_rows_must_be_zero(self) -> None:
        m = module(d.PACK, weight_packed=tensor("I32", [[0x8]]),
                   weight_shape=tensor("I64", [1, 1]), weight_scale=tensor("F32", [[1.0]]),
                   weight_zero_point=tensor("I32", [[0x18]]))  # slot 1 = row 1 does not exist
        with self.assertRaisesRegex(d.FormatError, "padding"):
            d.decode_pack(m, args(bits=4, symmetric=False, strategy="channel"))

    def test_zero_point_presence_follows_symmetric(self) -> None:
        m = module(d.PACK, weight_packed=tensor("I32", [[0x8]]),
                   weight_shape=tensor("I64", [1, 1]), weight_scale=tensor("F32", [[1.0]]),
                   weight_zero_point=tensor("I32", [[0x8]]))
        with self.assertRaisesRegex(d.FormatError, "symmetric=True"):
            d.decode_pack(m, args(bits=4, strategy="channel"))
        del m.parts["weight_zero_point"]
        with self.assertRaisesRegex(d.FormatError, "symmetric=False"):
            d.decode_pack(m, args(bits=4, symmetric=False, strategy="channel"))

    def test_ragged_last_group_and_scale_shape(self) -> None:
        # cols = 5, group_size = 2 -> 3 groups, the last holding one column.
        m = module(d.PACK, weight_packed=tensor("I32", [pack_reference([9, 9, 9, 9, 9], 4)]),
                   weight_shape=tensor("I64", [1, 5]),
                   weight_scale=tensor("F32", [[1.0, 2.0, 4.0]]))
        w = d.decode_pack(m, args(bits=4, strategy="group", group_size=2))
        np.testing.assert_array_equal(w, [[1.0, 1.0, 2.0, 2.0, 4.0]])
        m.parts["weight_scale"] = tensor("F32", [[1.0, 2.0]])
        with self.assertRaisesRegex(d.FormatError, r"expected F32/F16/BF16\[1, 3\]"):
            d.decode_pack(m, args(bits=4, strategy="group", group_size=2))


class IntAndFloatQuantized(unittest.TestCase):
    def test_int8_asymmetric_channel(self) -> None:
        m = module(d.INT, weight=tensor("I8", [[-128, 127], [0, 5]]),
                   weight_scale=tensor("F32", [[0.5], [2.0]]),
                   weight_zero_point=tensor("I8", [[1], [-2]]))
        w = d.decode_int(m, args(bits=8, symmetric=False, strategy="channel"))
        np.testing.assert_array_equal(w, [[-64.5, 63.0], [4.0, 14.0]])

    def test_int8_symmetric_tensor(self) -> None:
        m = module(d.INT, weight=tensor("I8", [[-3, 4]]), weight_scale=tensor("F16", [0.125]))
        w = d.decode_int(m, args(bits=8))
        np.testing.assert_array_equal(w, [[-0.375, 0.5]])

    def test_fp8_times_channel_scale(self) -> None:
        # E4M3 0x38 = 1, 0x7E = 448, 0xB8 = -1, 0x01 = 2**-9.
        m = module(d.FLOAT, weight=tensor("F8_E4M3", [[0x38, 0x7E], [0xB8, 0x01]]),
                   weight_scale=tensor("F32", [[0.5], [3.0]]))
        w = d.decode_float(m, args(bits=8, kind="float", strategy="channel"))
        np.testing.assert_array_equal(w, [[0.5, 224.0], [-3.0, 3.0 * 2.0 ** -9]])

    def test_fp8_nan_is_a_failure(self) -> None:
        m = module(d.FLOAT, weight=tensor("F8_E4M3", [[0x7F]]), weight_scale=tensor("F32", [1.0]))
        with self.assertRaisesRegex(d.FormatError, "NaN"):
            d.decode_float(m, args(bits=8, kind="float"))


class SparseBitmask(unittest.TestCase):
    def layout(self, bitmask: list[list[int]], offsets: list[int],
               values: list[float]) -> d.Module:
        return module(d.BITMASK, shape=tensor("I64", [2, 10]), bitmask=tensor("U8", bitmask),
                      row_offsets=tensor("I64", offsets), compressed=tensor("F32", values))

    def test_hand_example(self) -> None:
        # Row 0 non-zero at columns 1 and 8: bytes 0b00000010, 0b00000001.
        # Row 1 non-zero at columns 0, 7 and 9: bytes 0b10000001, 0b00000010.
        m = self.layout([[0x02, 0x01], [0x81, 0x02]], [0, 2], [1.5, -2.0, 3.0, 0.25, 0.5])
        want = np.zeros((2, 10), np.float32)
        want[0, 1], want[0, 8], want[1, 0], want[1, 7], want[1, 9] = 1.5, -2.0, 3.0, 0.25, 0.5
        np.testing.assert_array_equal(d.decode_bitmask(m), want)
        self.assertEqual(np.packbits(want != 0, axis=1, bitorder="little").tolist(),
                         [[0x02, 0x01], [0x81, 0x02]])

    def test_row_offsets_are_checked(self) -> None:
        m = self.layout([[0x02, 0x01], [0x81, 0x02]], [0, 3], [1.5, -2.0, 3.0, 0.25, 0.5])
        with self.assertRaisesRegex(d.FormatError, "row 1 starts at 3, the bitmask gives 2"):
            d.decode_bitmask(m)

    def test_value_count_is_checked(self) -> None:
        m = self.layout([[0x02, 0x01], [0x81, 0x02]], [0, 2], [1.5, -2.0, 3.0, 0.25])
        with self.assertRaisesRegex(d.FormatError, "5 set bits but compressed holds 4"):
            d.decode_bitmask(m)

    def test_stored_zero_is_a_failure(self) -> None:
        m = self.layout([[0x02, 0x01], [0x81, 0x02]], [0, 2], [1.5, -0.0, 3.0, 0.25, 0.5])
        with self.assertRaisesRegex(d.FormatError, "1 stored values are zero"):
            d.decode_bitmask(m)

    def test_padding_bits_are_checked(self) -> None:
        m = self.layout([[0x02, 0x05], [0x81, 0x02]], [0, 3], [1.5, -2.0, 9.0, 3.0, 0.25, 0.5])
        with self.assertRaisesRegex(d.FormatError, "padding bits past column 10"):
            d.decode_bitmask(m)


class Casting(unittest.TestCase):
    def test_bf16_round_to_nearest_even(self) -> None:
        bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0xBF80FFFF], dtype="<u4")
        dtype, raw = d.encode(bits.view("<f4"), "BF16")
        self.assertEqual(dtype, "BF16")
        self.assertEqual(np.frombuffer(raw, "<u2").tolist(), [0x3F80, 0x3F82, 0x3F81, 0xBF81])

    def test_f16_and_integers(self) -> None:
        dtype, raw = d.encode(np.array([1.0 + 2.0 ** -11], np.float32), "F16")
        self.assertEqual((dtype, np.frombuffer(raw, "<u2").tolist()), ("F16", [0x3C00]))
        dtype, raw = d.encode(np.array([1, -2], np.int64), "BF16")
        self.assertEqual((dtype, raw), ("I64", struct.pack("<qq", 1, -2)))

    def test_f64_to_bf16_rounds_once(self) -> None:
        # 1 + 2**-8 + 2**-30 is just above the bf16 halfway point; rounding to f32 first
        # would land exactly on the halfway point and round down to even.
        dtype, raw = d.encode(np.array([1 + 2.0 ** -8 + 2.0 ** -30]), "BF16")
        self.assertEqual(np.frombuffer(raw, "<u2").tolist(), [0x3F81])


# ---------------------------------------------------------------------------
# whole checkpoints


UP = "model.layers.0.mlp.up_proj"
DOWN = "model.layers.0.mlp.down_proj"
GATE = "model.layers.0.mlp.gate_proj"
Q = "model.layers.0.self_attn.q_proj"
EMBED = "model.embed_tokens"
BASE_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4, "torch_dtype": "float32"}


def quant_config(sparsity: dict | None = None) -> dict:
    return {
        "quant_method": "compressed-tensors", "version": "0.0.0", "format": "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": [UP], "format": d.PACK, "input_activations": None,
                        "output_activations": None,
                        "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                    "strategy": "group", "group_size": 2, "observer": "minmax"}},
            "group_1": {"targets": ["Linear"], "format": d.INT, "input_activations": None,
                        "output_activations": None,
                        "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                                    "strategy": "channel", "group_size": None}},
        },
        "ignore": [EMBED, Q],
        "kv_cache_scheme": None,
        "sparsity_config": sparsity or {},
        "transform_config": {},
    }


def compressed_checkpoint() -> tuple[list[dict[str, Tensor]], dict[str, np.ndarray]]:
    """Shards of a small compressed checkpoint and the dense values they encode."""
    # up_proj: 4-bit asymmetric, groups of 2 over 3 columns, 2 rows.
    up_q = np.array([[-8, 7, 3], [0, -1, 2]])
    up_z = np.array([[1, -2], [0, 3]])
    up_s = np.array([[0.5, 0.25], [2.0, 1.0]], np.float32)
    up = (up_q - np.repeat(up_z, 2, axis=1)[:, :3]) * np.repeat(up_s, 2, axis=1)[:, :3]
    # down_proj and gate_proj: int8 symmetric channel (targets Linear).
    down_q = np.array([[5, -5], [127, -128]])
    down_s = np.array([[0.5], [0.125]], np.float32)
    gate_q = np.array([[1, 2]])
    # q_proj: sparse-bitmask.
    q = np.array([[0, 1.5, 0, 0, 0, 0, 0, 0, -2, 0], [3, 0, 0, 0, 0, 0, 0, 0.25, 0, 0.5]])
    embed = np.array([[1.0, -2.0], [0.5, 0.0]])
    shards = [
        {
            # u = q + 8: row 0 -> 0, 15, 11; row 1 -> 8, 7, 10.
            f"{UP}.weight_packed": tensor("I32", [[0x0BF0], [0x0A78]]),
            f"{UP}.weight_shape": tensor("I64", [2, 3]),
            f"{UP}.weight_scale": tensor("F32", up_s),
            # z + 8: rows 0, 1 of group 0 -> 9, 8; of group 1 -> 6, 11.
            f"{UP}.weight_zero_point": tensor("I32", [[0x89, 0xB6]]),
            f"{DOWN}.weight": tensor("I8", down_q),
            f"{DOWN}.weight_scale": bf16(down_s),
            f"{GATE}.weight": tensor("I8", gate_q),
            f"{GATE}.weight_scale": tensor("F32", [[3.0]]),
        },
        {
            f"{Q}.shape": tensor("I64", [2, 10]),
            f"{Q}.compressed": bf16([1.5, -2.0, 3.0, 0.25, 0.5]),
            f"{Q}.bitmask": tensor("U8", [[0x02, 0x01], [0x81, 0x02]]),
            f"{Q}.row_offsets": tensor("I64", [0, 2]),
            f"{EMBED}.weight": bf16(embed),
            "model.norm.weight": tensor("F32", [1.0, 1.0 + 2.0 ** -9]),
            "position_ids": tensor("I64", [[0, 1, 2]]),
        },
    ]
    dense = {f"{UP}.weight": up, f"{DOWN}.weight": down_q * down_s, f"{GATE}.weight": gate_q * 3.0,
             f"{Q}.weight": q, f"{EMBED}.weight": embed,
             "model.norm.weight": np.array([1.0, 1.0 + 2.0 ** -9])}
    return shards, dense


def bf16_config() -> dict:
    return {**BASE_CONFIG, "torch_dtype": "bfloat16"}


class WholeCheckpoint(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.root = Path(self.tmp.name)
        self.shards, self.dense = compressed_checkpoint()
        self.sparsity = {"format": d.BITMASK, "global_sparsity": 0.5, "targets": [Q],
                         "ignore": [], "sparsity_structure": "unstructured",
                         "registry_requires_subclass": False}
        self.config = {**BASE_CONFIG, "quantization_config": quant_config(self.sparsity)}

    def tearDown(self) -> None:
        self.tmp.cleanup()

    def write_out(self, config: dict | None = None) -> Path:
        out = self.root / "out"
        write_checkpoint(out, self.shards, config or self.config)
        return out

    def expected_bf16(self) -> dict[str, Tensor]:
        """What `decompress --dtype bf16` should write for the checkpoint."""
        tensors = {name: bf16(values) for name, values in self.dense.items()
                   if name != "model.norm.weight"}
        # 1 + 2**-9 is a quarter of a bf16 ulp above 1: it rounds to 1.
        tensors["model.norm.weight"] = tensor("BF16", [0x3F80, 0x3F80])
        tensors["position_ids"] = tensor("I64", [[0, 1, 2]])
        return tensors

    def write_decompressed(self, tensors: dict[str, Tensor] | None = None,
                           config: dict | None = None) -> Path:
        dec = self.root / "dec"
        write_checkpoint(dec, [tensors or self.expected_bf16()], config or bf16_config())
        return dec

    def run_main(self, out: Path, dec: Path, dtype: str = "bf16") -> tuple[int, dict, str]:
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = d.main(["--output", str(out), "--decompressed", str(dec), "--dtype", dtype])
        return code, json.loads(stdout.getvalue()), stderr.getvalue()

    def test_decode_checkpoint(self) -> None:
        decoded = d.decode_checkpoint(self.write_out())
        for name, values in self.dense.items():
            np.testing.assert_array_equal(decoded.tensors[name], values, err_msg=name)
            self.assertEqual(decoded.tensors[name].dtype, np.float32, name)
        self.assertEqual(decoded.tensors["position_ids"].dtype, np.int64)
        self.assertEqual(decoded.formats[f"{UP}.weight"], d.PACK)
        self.assertEqual(decoded.formats[f"{DOWN}.weight"], d.INT)
        self.assertEqual(decoded.formats[f"{Q}.weight"], d.BITMASK)
        self.assertEqual(decoded.formats[f"{EMBED}.weight"], d.UNCOMPRESSED)
        self.assertEqual(decoded.pruned, {f"{Q}.weight"})
        self.assertEqual(decoded.quantized, {f"{UP}.weight", f"{DOWN}.weight", f"{GATE}.weight"})

    def test_cli_matches_and_reports(self) -> None:
        code, summary, stderr = self.run_main(self.write_out(), self.write_decompressed())
        self.assertEqual(code, 0, stderr)
        self.assertEqual(summary["tensors"], 7)
        self.assertEqual(summary["by_format"], {d.PACK: 1, d.INT: 2, d.BITMASK: 1,
                                                d.UNCOMPRESSED: 3})
        self.assertEqual(summary["mismatches"], [])

    def test_cli_finds_a_flipped_bit(self) -> None:
        tensors = self.expected_bf16()
        tensors["model.norm.weight"] = tensor("BF16", [0x3F80, 0x3F81])  # rounded up
        code, summary, stderr = self.run_main(self.write_out(), self.write_decompressed(tensors))
        self.assertEqual(code, 1)
        self.assertEqual(summary["mismatches"], ["model.norm.weight"])
        self.assertIn("expected bits 0x3f80, got 0x3f81", stderr)

    def test_cli_checks_names_and_config(self) -> None:
        tensors = self.expected_bf16()
        del tensors["position_ids"]
        config = {**bf16_config(), "hidden_size": 5, "sparsity_config": {}}
        code, _, stderr = self.run_main(self.write_out(), self.write_decompressed(tensors, config))
        self.assertEqual(code, 1)
        self.assertIn("lacks 1 tensors: ['position_ids']", stderr)
        self.assertIn("hidden_size is 5, expected 4", stderr)
        self.assertIn("still holds sparsity_config", stderr)

    def test_cli_f32(self) -> None:
        tensors = {name: tensor("F32", values) for name, values in self.dense.items()}
        tensors["position_ids"] = tensor("I64", [[0, 1, 2]])
        dec = self.write_decompressed(tensors, {**BASE_CONFIG, "torch_dtype": "float32"})
        code, _, stderr = self.run_main(self.write_out(), dec, "f32")
        self.assertEqual(code, 0, stderr)

    def test_usage_errors_exit_2(self) -> None:
        with contextlib.redirect_stderr(io.StringIO()):
            with self.assertRaises(SystemExit) as raised:
                d.main(["--output", str(self.root / "none"), "--decompressed", str(self.root),
                        "--dtype", "bf16"])
            self.assertEqual(raised.exception.code, 2)
            with self.assertRaises(SystemExit) as raised:
                d.main(["--output", str(self.root), "--dtype", "f8"])
            self.assertEqual(raised.exception.code, 2)

    def assert_decode_fails(self, pattern: str, config: dict | None = None) -> None:
        _, failures = d.decode(self.write_out(config))
        self.assertTrue(any(pattern in f for f in failures), failures)

    def test_format_must_match_config_group(self) -> None:
        config = json.loads(json.dumps(self.config))
        config["quantization_config"]["config_groups"]["group_0"]["format"] = d.INT
        config["quantization_config"]["format"] = d.INT
        self.assert_decode_fails(f"{UP}: stored pack-quantized but config_groups.group_0.format "
                                 "is int-quantized", config)

    def test_top_level_format(self) -> None:
        config = json.loads(json.dumps(self.config))
        config["quantization_config"]["format"] = d.PACK
        self.assert_decode_fails("the groups give 'mixed-precision'", config)

    def test_linear_group_covers_unignored_weights(self) -> None:
        config = json.loads(json.dumps(self.config))
        config["quantization_config"]["ignore"] = [Q]
        self.assert_decode_fails(f"neither quantized nor in ignore: ['{EMBED}']", config)

    def test_ignored_module_must_not_be_quantized(self) -> None:
        config = json.loads(json.dumps(self.config))
        config["quantization_config"]["ignore"].append(DOWN)
        self.assert_decode_fails(f"{DOWN}: stored quantized but no config group targets it "
                                 "(it is in ignore)", config)

    def test_symmetric_must_match_zero_points(self) -> None:
        config = json.loads(json.dumps(self.config))
        config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = True
        self.assert_decode_fails("weight_zero_point is present but the config says "
                                 "symmetric=True", config)

    def test_sparse_module_must_be_targeted(self) -> None:
        config = json.loads(json.dumps(self.config))
        config["quantization_config"]["sparsity_config"]["targets"] = [EMBED]
        self.assert_decode_fails(f"not targeted by sparsity_config: ['{Q}']", config)

    def test_dense_sparsity_format_forbids_bitmask(self) -> None:
        config = json.loads(json.dumps(self.config))
        config["quantization_config"]["sparsity_config"]["format"] = "dense"
        self.assert_decode_fails("sparsity_config.format is dense", config)

    def test_incomplete_layouts(self) -> None:
        del self.shards[1][f"{Q}.row_offsets"]
        del self.shards[0][f"{GATE}.weight"]
        _, failures = d.decode(self.write_out())
        self.assertIn(f"{Q}: sparse-bitmask layout lacks ['row_offsets']", failures)
        self.assertTrue(any(f.startswith(f"{GATE}: holds weight_scale but neither")
                            for f in failures), failures)

    def test_decode_checkpoint_raises(self) -> None:
        self.shards[0][f"{UP}.weight_packed"] = tensor("I32", [[0x0BF0], [0x1A78]])
        with self.assertRaises(d.DecodeError) as raised:
            d.decode_checkpoint(self.write_out())
        self.assertIn("padding fields", str(raised.exception))

    def test_pruned_only_config(self) -> None:
        # Nothing quantized: only sparsity_config; dense pruned weights are reported as dense.
        shards = [{f"{Q}.weight": tensor("F32", self.dense[f"{Q}.weight"]),
                   f"{EMBED}.weight": tensor("F32", self.dense[f"{EMBED}.weight"])}]
        config = {**BASE_CONFIG, "quantization_config": {
            "quant_method": "compressed-tensors", "version": "0.0.0",
            "sparsity_config": {**self.sparsity, "format": "dense", "targets": ["Linear"],
                                "ignore": [EMBED]}}}
        out = self.root / "pruned"
        write_checkpoint(out, shards, config)
        decoded = d.decode_checkpoint(out)
        self.assertEqual(decoded.formats, {f"{Q}.weight": d.DENSE,
                                           f"{EMBED}.weight": d.UNCOMPRESSED})
        self.assertEqual(decoded.pruned, {f"{Q}.weight"})


if __name__ == "__main__":
    unittest.main()
