"""Tests of llama_forward.py: the forward pass against hand-computed values and a
naive loop, the pruning equivalence on a layer sliced by hand, and the CLI.

Run from tests/python with `python -m unittest`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
import unittest
from pathlib import Path

import numpy as np

import llama_forward as lf
from checkpoint_fixtures import tensor, write_checkpoint

# 4 query heads over 2 KV heads (n_rep 2), head_dim 4 (= 16 / 4, the default), 6 neurons.
CFG = lf.LayerConfig(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=4,
                     intermediate_size=6, rms_norm_eps=1e-5, rope_theta=10000.0)
# Keep KV head 1 (query heads 2 and 3) and neurons 0, 2, 5.
KV_KEPT, MLP_KEPT = [1], [0, 2, 5]
# head_dim stays 4, which the pruned config must state (16 / 2 heads would give 8).
PRUNED_CFG = lf.LayerConfig(16, 2, 1, 4, 3, 1e-5, 10000.0)
Q_ROWS = list(range(8, 16))  # query heads 2, 3: rows 2*4..3*4+3
KV_ROWS = list(range(4, 8))  # KV head 1


def random_layer(rng: np.random.Generator, cfg: lf.LayerConfig, biases: bool) -> lf.Weights:
    return {name: rng.standard_normal(shape) * (1.0 if "norm" in name else 0.5)
            for name, shape in cfg.shapes().items() if biases or name.endswith(".weight")}


def slice_by_hand(w: lf.Weights) -> lf.Weights:
    """The layer pruned to KV_KEPT and MLP_KEPT, row and column lists written out."""
    out = {name: value.copy() for name, value in w.items()}
    for name, rows in (("self_attn.q_proj", Q_ROWS), ("self_attn.k_proj", KV_ROWS),
                       ("self_attn.v_proj", KV_ROWS), ("mlp.gate_proj", MLP_KEPT),
                       ("mlp.up_proj", MLP_KEPT)):
        out[f"{name}.weight"] = w[f"{name}.weight"][rows, :]
        if f"{name}.bias" in w:
            out[f"{name}.bias"] = w[f"{name}.bias"][rows]
    out["self_attn.o_proj.weight"] = w["self_attn.o_proj.weight"][:, Q_ROWS]
    out["mlp.down_proj.weight"] = w["mlp.down_proj.weight"][:, MLP_KEPT]
    return out


def naive_attention(x: np.ndarray, w: lf.Weights, cfg: lf.LayerConfig) -> np.ndarray:
    """Attention one head, query and key at a time, RoPE as pairwise rotations."""
    def proj(name: str) -> np.ndarray:
        bias = w.get(f"{name}.bias", 0.0)
        return x @ w[f"{name}.weight"].T + bias

    q, k, v = proj("self_attn.q_proj"), proj("self_attn.k_proj"), proj("self_attn.v_proj")
    d, half = cfg.head_dim, cfg.head_dim // 2

    def rotate(vec: np.ndarray, pos: int) -> np.ndarray:
        out = np.empty_like(vec)
        for i in range(half):
            angle = pos * cfg.rope_theta ** (-2 * i / d)
            a, b = vec[i], vec[i + half]
            out[i] = a * math.cos(angle) - b * math.sin(angle)
            out[i + half] = b * math.cos(angle) + a * math.sin(angle)
        return out

    tokens = x.shape[0]
    heads_out = np.zeros((tokens, cfg.num_heads * d))
    for h in range(cfg.num_heads):
        g = h // (cfg.num_heads // cfg.num_kv_heads)
        for t in range(tokens):
            qt = rotate(q[t, h * d:(h + 1) * d], t)
            scores = [float(qt @ rotate(k[s, g * d:(g + 1) * d], s)) / math.sqrt(d)
                      for s in range(t + 1)]
            top = max(scores)
            weights = [math.exp(sc - top) for sc in scores]
            total = sum(weights)
            for s in range(t + 1):
                heads_out[t, h * d:(h + 1) * d] += weights[s] / total * v[s, g * d:(g + 1) * d]
    return heads_out @ w["self_attn.o_proj.weight"].T + w.get("self_attn.o_proj.bias", 0.0)


class Pieces(unittest.TestCase):
    def test_rms_norm(self) -> None:
        out = lf.rms_norm(np.array([[3.0, 4.0]]), np.array([1.0, 2.0]), 0.0)
        rms = math.sqrt((9 + 16) / 2)
        np.testing.assert_allclose(out, [[3 / rms, 8 / rms]], rtol=1e-15)

    def test_rope(self) -> None:
        x = np.array([[[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]]])  # one head, 3 positions, dim 2
        out = lf.rope(x, 10000.0)
        np.testing.assert_array_equal(out[0, 0], [1.0, 2.0])  # position 0: no rotation
        c, s = math.cos(2.0), math.sin(2.0)  # position 2, frequency 1
        np.testing.assert_allclose(out[0, 2], [c - 2 * s, 2 * c + s], rtol=1e-15)
        # dim 4: the second pair turns at theta**-0.5 radians per position.
        x = np.array([[[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]])
        angle = 100.0 ** -0.5
        np.testing.assert_allclose(lf.rope(x, 100.0)[0, 1],
                                   [0.0, math.cos(angle), 0.0, math.sin(angle)], atol=1e-15)

    def test_first_token_attends_only_to_itself(self) -> None:
        rng = np.random.default_rng(3)
        w = random_layer(rng, CFG, biases=False)
        x = rng.standard_normal((3, CFG.hidden_size))
        v = x[0] @ w["self_attn.v_proj.weight"].T  # [2 KV heads * 4]
        heads = np.concatenate([v[0:4], v[0:4], v[4:8], v[4:8]])
        np.testing.assert_allclose(lf.attention(x, w, CFG)[0],
                                   heads @ w["self_attn.o_proj.weight"].T, rtol=1e-12)

    def test_attention_matches_a_naive_loop(self) -> None:
        rng = np.random.default_rng(4)
        for biases in (False, True):
            w = random_layer(rng, CFG, biases)
            x = rng.standard_normal((5, CFG.hidden_size))
            np.testing.assert_allclose(lf.attention(x, w, CFG), naive_attention(x, w, CFG),
                                       rtol=1e-12, atol=1e-12)

    def test_mlp(self) -> None:
        w = {"mlp.gate_proj.weight": np.array([[1.0, 0.0]]),
             "mlp.up_proj.weight": np.array([[0.0, 2.0]]),
             "mlp.down_proj.weight": np.array([[1.0], [-1.0]])}
        silu = 1.5 / (1 + math.exp(-1.5))
        np.testing.assert_allclose(lf.mlp(np.array([[1.5, 0.5]]), w), [[silu, -silu]],
                                   rtol=1e-15)


class PruningEquivalence(unittest.TestCase):
    def test_zero_removed_matches_hand_zeroing(self) -> None:
        w = random_layer(np.random.default_rng(5), CFG, biases=True)
        zeroed = lf.zero_removed(w, CFG, MLP_KEPT, KV_KEPT)
        want = {name: value.copy() for name, value in w.items()}
        for name in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
            want[name][0:8] = 0.0  # query heads 0, 1 of KV head 0
        for name in ("self_attn.k_proj.weight", "self_attn.k_proj.bias",
                     "self_attn.v_proj.weight", "self_attn.v_proj.bias"):
            want[name][0:4] = 0.0
        want["self_attn.o_proj.weight"][:, 0:8] = 0.0
        for name in ("mlp.gate_proj.weight", "mlp.gate_proj.bias",
                     "mlp.up_proj.weight", "mlp.up_proj.bias"):
            want[name][[1, 3, 4]] = 0.0
        want["mlp.down_proj.weight"][:, [1, 3, 4]] = 0.0
        self.assertEqual(set(zeroed), set(want))
        for name in want:
            np.testing.assert_array_equal(zeroed[name], want[name], err_msg=name)

    def test_sliced_layer_equals_zeroed_layer(self) -> None:
        rng = np.random.default_rng(6)
        for biases in (False, True):
            w = random_layer(rng, CFG, biases)
            x = rng.standard_normal((5, CFG.hidden_size))
            pruned = lf.decoder_layer(x, slice_by_hand(w), PRUNED_CFG)
            zeroed = lf.decoder_layer(x, lf.zero_removed(w, CFG, MLP_KEPT, KV_KEPT), CFG)
            np.testing.assert_allclose(pruned, zeroed, rtol=1e-12, atol=1e-12)
            self.assertGreater(np.max(np.abs(lf.decoder_layer(x, w, CFG) - zeroed)), 1e-3)

    def test_wrong_query_heads_break_the_equivalence(self) -> None:
        # Keeping query heads 0, 1 with KV head 1 is not a valid GQA slice.
        w = random_layer(np.random.default_rng(7), CFG, biases=False)
        x = np.random.default_rng(8).standard_normal((5, CFG.hidden_size))
        wrong = slice_by_hand(w)
        wrong["self_attn.q_proj.weight"] = w["self_attn.q_proj.weight"][0:8]
        wrong["self_attn.o_proj.weight"] = w["self_attn.o_proj.weight"][:, 0:8]
        zeroed = lf.decoder_layer(x, lf.zero_removed(w, CFG, MLP_KEPT, KV_KEPT), CFG)
        self.assertGreater(np.max(np.abs(lf.decoder_layer(x, wrong, PRUNED_CFG) - zeroed)), 1e-3)


def config(cfg: lf.LayerConfig, layers: int, head_dim: bool) -> dict:
    out = {"architectures": ["LlamaForCausalLM"], "hidden_size": cfg.hidden_size,
           "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
           "intermediate_size": cfg.intermediate_size, "num_hidden_layers": layers,
           "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
           "torch_dtype": "float32"}
    if head_dim:
        out["head_dim"] = cfg.head_dim
    return out


class Cli(unittest.TestCase):
    """An original of 2 layers; the pruned model drops layer 0 and slices layer 1."""

    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.root = Path(self.tmp.name)
        rng = np.random.default_rng(9)
        self.layers = [{n: v.astype(np.float32) for n, v in random_layer(rng, CFG, False).items()}
                       for _ in range(2)]
        embed = rng.standard_normal((11, CFG.hidden_size)).astype(np.float32)
        original = {f"model.layers.{i}.{n}": tensor("F32", v)
                    for i, layer in enumerate(self.layers) for n, v in layer.items()}
        original["model.embed_tokens.weight"] = tensor("F32", embed)
        write_checkpoint(self.root / "orig", [original], config(CFG, 2, head_dim=False))
        self.pruned = {f"model.layers.0.{n}": v for n, v in slice_by_hand(self.layers[1]).items()}
        self.pruned["model.embed_tokens.weight"] = embed
        self.report = {"structured": {"dropped_layers": [0], "layers": [
            {"source_layer": 1, "output_layer": 0, "mlp_kept": MLP_KEPT,
             "kv_heads_kept": KV_KEPT}]}}

    def tearDown(self) -> None:
        self.tmp.cleanup()

    def run_main(self, *extra: str, pruned_cfg: lf.LayerConfig = PRUNED_CFG,
                 head_dim: bool = True) -> tuple[int, dict, str]:
        pruned = self.root / "pruned"
        write_checkpoint(pruned, [{n: tensor("F32", v) for n, v in self.pruned.items()}],
                         config(pruned_cfg, 1, head_dim))
        (pruned / "report.json").write_text(json.dumps(self.report))
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = lf.main(["--original", str(self.root / "orig"), "--pruned", str(pruned),
                            "--layer", "0", *extra])
        return code, json.loads(stdout.getvalue()), stderr.getvalue()

    def test_valid_pruning_passes(self) -> None:
        code, summary, stderr = self.run_main("--seed", "3")
        self.assertEqual(code, 0, stderr)
        self.assertEqual((summary["source_layer"], summary["mlp_neurons_removed"],
                          summary["kv_heads_removed"], summary["shapes_checked"]), (1, 3, 1, 9))
        self.assertLess(summary["max_abs_difference"], 1e-9)
        self.assertGreater(summary["removed_effect"], 1e-6)

    def test_wrong_source_layer_fails(self) -> None:
        self.pruned = {f"model.layers.0.{n}": v for n, v in slice_by_hand(self.layers[0]).items()
                       } | {"model.embed_tokens.weight": self.pruned["model.embed_tokens.weight"]}
        code, _, stderr = self.run_main()
        self.assertEqual(code, 1)
        self.assertIn("pruned layer 0 differs from source layer 1", stderr)

    def test_shuffled_neurons_fail(self) -> None:
        down = self.pruned["model.layers.0.mlp.down_proj.weight"]
        self.pruned["model.layers.0.mlp.down_proj.weight"] = down[:, [0, 2, 1]]
        code, _, stderr = self.run_main()
        self.assertEqual(code, 1)
        self.assertIn("differs from source layer", stderr)

    def test_shapes_and_report_are_checked(self) -> None:
        self.pruned["model.layers.0.mlp.up_proj.weight"] = np.zeros((4, 16), np.float32)
        self.pruned["model.layers.1.input_layernorm.weight"] = np.ones(16, np.float32)
        self.report["structured"]["layers"][0]["kv_heads_kept"] = [1, 0]
        self.report["structured"]["dropped_layers"] = []
        code, _, stderr = self.run_main()
        self.assertEqual(code, 1)
        self.assertIn("up_proj.weight: shape [4, 16], the config gives [3, 16]", stderr)
        self.assertIn("layer 1 is past num_hidden_layers = 1", stderr)
        self.assertIn("kv_heads_kept is not sorted", stderr)
        self.assertIn("do not split 0..1", stderr)

    def test_pruned_config_needs_head_dim(self) -> None:
        code, _, stderr = self.run_main(head_dim=False)
        self.assertEqual(code, 1)
        self.assertIn("no explicit head_dim", stderr)

    def test_nothing_removed_fails(self) -> None:
        self.pruned = {f"model.layers.0.{n}": v for n, v in self.layers[1].items()} | {
            "model.embed_tokens.weight": self.pruned["model.embed_tokens.weight"]}
        self.report["structured"]["layers"][0].update(mlp_kept=list(range(6)),
                                                      kv_heads_kept=[0, 1])
        code, summary, stderr = self.run_main(pruned_cfg=CFG)
        self.assertEqual(code, 1)
        self.assertEqual(summary["removed_effect"], 0.0)
        self.assertIn("nothing that matters was removed", stderr)


if __name__ == "__main__":
    unittest.main()
