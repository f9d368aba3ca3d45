#!/usr/bin/env python3
"""Checks structured pruning of a Llama-style checkpoint with a numpy forward pass.

Structured pruning removes whole MLP neurons (rows of gate_proj and up_proj,
columns of down_proj) and whole attention KV groups (a kept KV head h keeps its
head_dim rows of k_proj and v_proj, and the rows of its n_rep =
num_attention_heads / num_key_value_heads query heads h * n_rep ..
(h + 1) * n_rep - 1 in q_proj, and their columns of o_proj), and may drop
layers. PRUNED_DIR's report.json says what was kept:

  "structured": {"dropped_layers": [...], "layers": [{"source_layer": i,
      "output_layer": j, "mlp_kept": [...], "kv_heads_kept": [...]}, ...]}

For pruned layer J this runs one decoder layer in float64 on a seeded random
hidden state of 5 tokens (a) with the pruned weights and config, and (b) with
the original source layer and config after zeroing what was removed, and
checks (a) == (b) within rtol = atol = 1e-9; the unzeroed original layer must
differ from (b) by more than 1e-6 (the removed parts mattered). It also checks
that every weight shape of PRUNED_DIR agrees with its config.json and that the
report is consistent with both configs.

The layer: RMSNorm (rms_norm_eps), q/k/v projections (biases when present),
RoPE with rope_theta (default 10000, rotate-half convention, positions
0..T-1), grouped-query causal attention with softmax scaled by
1/sqrt(head_dim), o_proj, residual, RMSNorm, SiLU(gate) * up, down_proj,
residual. rope_scaling is not modelled: both passes use the same plain RoPE,
so the comparison does not depend on it. Both checkpoints must hold the kept
weights in the same dtype (decompress PRUNED_DIR to the original dtype).

Usage:
  llama_forward.py --original ORIG_DIR --pruned PRUNED_DIR --layer J [--seed 0]
                   [--report REPORT_JSON]

A JSON summary is printed on stdout. Every failure is printed on stderr and the
exit status is 1; a usage error exits with 2.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from decode_output import float_array, load_checkpoint
from verify_output import Fatal, Tensor, load_json

TOKENS = 5
RTOL = ATOL = 1e-9
MIN_EFFECT = 1e-6
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

Weights = dict[str, np.ndarray]  # tensors of one layer, keyed by the name after "model.layers.{i}."


@dataclass(frozen=True)
class LayerConfig:
    """The config.json values one decoder layer depends on."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float

    @staticmethod
    def from_config(config: dict, require_head_dim: bool) -> LayerConfig:
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            if require_head_dim and "head_dim" not in config:
                raise Fatal("the pruned config.json has no explicit head_dim")
            head_dim = int(config.get("head_dim") or hidden // heads)
            cfg = LayerConfig(hidden, heads, kv_heads, head_dim,
                              int(config["intermediate_size"]), float(config["rms_norm_eps"]),
                              float(config.get("rope_theta", 10000.0)))
        except (KeyError, TypeError, ValueError) as err:
            raise Fatal(f"config.json lacks a usable Llama layer setting: {err!r}") from err
        if kv_heads <= 0 or heads % kv_heads or head_dim % 2:
            raise Fatal(f"config.json: {heads} attention heads over {kv_heads} KV heads with "
                        f"head_dim {head_dim} is not a grouped-query layout with even head_dim")
        return cfg

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads

    def shapes(self) -> dict[str, list[int]]:
        """Expected shape of every weight (and optional bias) of a layer."""
        q, kv, hidden, inter = (self.num_heads * self.head_dim,
                                self.num_kv_heads * self.head_dim,
                                self.hidden_size, self.intermediate_size)
        return {
            "input_layernorm.weight": [hidden], "post_attention_layernorm.weight": [hidden],
            "self_attn.q_proj.weight": [q, hidden], "self_attn.q_proj.bias": [q],
            "self_attn.k_proj.weight": [kv, hidden], "self_attn.k_proj.bias": [kv],
            "self_attn.v_proj.weight": [kv, hidden], "self_attn.v_proj.bias": [kv],
            "self_attn.o_proj.weight": [hidden, q], "self_attn.o_proj.bias": [hidden],
            "mlp.gate_proj.weight": [inter, hidden], "mlp.gate_proj.bias": [inter],
            "mlp.up_proj.weight": [inter, hidden], "mlp.up_proj.bias": [inter],
            "mlp.down_proj.weight": [hidden, inter], "mlp.down_proj.bias": [hidden],
        }


# ---------------------------------------------------------------------------
# the forward pass


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def linear(x: np.ndarray, w: Weights, name: str) -> np.ndarray:
    out = x @ w[f"{name}.weight"].T
    bias = w.get(f"{name}.bias")
    return out if bias is None else out + bias


def rope(x: np.ndarray, theta: float) -> np.ndarray:
    """Rotary embedding of x [heads, T, head_dim] at positions 0..T-1 (rotate-half)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.arange(x.shape[1], dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    half = dim // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(angles) + rotated * np.sin(angles)


def attention(x: np.ndarray, w: Weights, cfg: LayerConfig) -> np.ndarray:
    """Grouped-query causal self-attention of x [T, hidden]."""
    tokens = x.shape[0]

    def heads(name: str, count: int) -> np.ndarray:
        return linear(x, w, name).reshape(tokens, count, cfg.head_dim).transpose(1, 0, 2)

    q = rope(heads("self_attn.q_proj", cfg.num_heads), cfg.rope_theta)
    k = rope(heads("self_attn.k_proj", cfg.num_kv_heads), cfg.rope_theta)
    v = heads("self_attn.v_proj", cfg.num_kv_heads)
    group = np.arange(cfg.num_heads) // cfg.n_rep  # KV head of each query head
    scores = q @ k[group].transpose(0, 2, 1) / math.sqrt(cfg.head_dim)
    future = np.triu(np.ones((tokens, tokens), dtype=bool), k=1)
    scores = np.where(future, -np.inf, scores)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    out = (probs @ v[group]).transpose(1, 0, 2).reshape(tokens, cfg.num_heads * cfg.head_dim)
    return linear(out, w, "self_attn.o_proj")


def mlp(x: np.ndarray, w: Weights) -> np.ndarray:
    gate = linear(x, w, "mlp.gate_proj")
    silu = gate / (1.0 + np.exp(-gate))
    return linear(silu * linear(x, w, "mlp.up_proj"), w, "mlp.down_proj")


def decoder_layer(x: np.ndarray, w: Weights, cfg: LayerConfig) -> np.ndarray:
    h = x + attention(rms_norm(x, w["input_layernorm.weight"], cfg.rms_norm_eps), w, cfg)
    return h + mlp(rms_norm(h, w["post_attention_layernorm.weight"], cfg.rms_norm_eps), w)


# ---------------------------------------------------------------------------
# pruning


def head_rows(heads: np.ndarray, head_dim: int) -> np.ndarray:
    """Row indices of the given heads in a projection with head_dim rows per head."""
    return (np.asarray(heads, dtype=np.int64)[:, None] * head_dim
            + np.arange(head_dim)).reshape(-1)


def zero_removed(w: Weights, cfg: LayerConfig, mlp_kept: list[int],
                 kv_heads_kept: list[int]) -> Weights:
    """A copy of the layer with the removed MLP neurons and KV groups zeroed."""
    out = {name: value.copy() for name, value in w.items()}
    neurons = np.setdiff1d(np.arange(cfg.intermediate_size), mlp_kept)
    removed_kv = np.setdiff1d(np.arange(cfg.num_kv_heads), kv_heads_kept)
    kv_rows = head_rows(removed_kv, cfg.head_dim)
    query_heads = (removed_kv[:, None] * cfg.n_rep + np.arange(cfg.n_rep)).reshape(-1)
    q_rows = head_rows(query_heads, cfg.head_dim)
    for name, rows in (("mlp.gate_proj", neurons), ("mlp.up_proj", neurons),
                       ("self_attn.q_proj", q_rows), ("self_attn.k_proj", kv_rows),
                       ("self_attn.v_proj", kv_rows)):
        out[f"{name}.weight"][rows, :] = 0.0
        if f"{name}.bias" in out:
            out[f"{name}.bias"][rows] = 0.0
    out["mlp.down_proj.weight"][:, neurons] = 0.0
    out["self_attn.o_proj.weight"][:, q_rows] = 0.0
    return out


# ---------------------------------------------------------------------------
# checkpoints


def layer_weights(tensors: dict[str, Tensor], layer: int) -> Weights:
    """The float64 tensors of one layer."""
    weights = {}
    for name, t in tensors.items():
        m = LAYER_RE.match(name)
        if m and int(m.group(1)) == layer:
            weights[m.group(2)] = float_array(t).astype(np.float64)
    return weights


def check_shapes(tensors: dict[str, Tensor], cfg: LayerConfig, layers: int,
                 failures: list[str]) -> int:
    """Checks every layer tensor's shape against the config; returns how many were checked."""
    shapes = cfg.shapes()
    seen: set[tuple[int, str]] = set()
    for name, t in sorted(tensors.items()):
        m = LAYER_RE.match(name)
        if not m:
            continue
        layer, rest = int(m.group(1)), m.group(2)
        seen.add((layer, rest))
        if layer >= layers:
            failures.append(f"{name}: layer {layer} is past num_hidden_layers = {layers}")
        elif rest in shapes and t.shape != shapes[rest]:
            failures.append(f"{name}: shape {t.shape}, the config gives {shapes[rest]}")
    required = [rest for rest in shapes if rest.endswith(".weight")]
    for layer in range(layers):
        missing = [rest for rest in required if (layer, rest) not in seen]
        if missing:
            failures.append(f"layer {layer} lacks {missing}")
    return sum(1 for layer, rest in seen if layer < layers and rest in shapes)


def sorted_indices(value: object, bound: int, count: int, what: str,
                   failures: list[str]) -> list[int]:
    if not (isinstance(value, list) and all(type(v) is int for v in value)):
        failures.append(f"report.json: {what} is not a list of indices: {value!r}")
        return []
    if value != sorted(set(value)) or (value and not 0 <= value[0] <= value[-1] < bound):
        failures.append(f"report.json: {what} is not sorted, unique and within 0..{bound - 1}")
    if len(value) != count:
        failures.append(f"report.json: {what} keeps {len(value)}, the pruned config says {count}")
    return value


def check_report(structured: object, original: dict, pruned: dict, orig_cfg: LayerConfig,
                 cfg: LayerConfig, failures: list[str]) -> list[dict]:
    """Checks report.json's structured section against both configs; returns its layers."""
    layers = structured.get("layers") if isinstance(structured, dict) else None
    if not (isinstance(layers, list) and all(isinstance(e, dict) for e in layers)):
        raise Fatal("report.json has no structured.layers list of objects")
    dropped = structured.get("dropped_layers")
    orig_layers, pruned_layers = original["num_hidden_layers"], pruned["num_hidden_layers"]
    if [e.get("output_layer") for e in layers] != list(range(pruned_layers)):
        failures.append(f"report.json: output_layer values are not 0..{pruned_layers - 1} "
                        "in order")
    sources = [e.get("source_layer") for e in layers]
    indices = sources + (dropped if isinstance(dropped, list) else [None])
    if (not all(type(i) is int for i in indices) or sources != sorted(sources)
            or sorted(indices) != list(range(orig_layers))):
        failures.append(f"report.json: source layers {sources} and dropped layers {dropped} "
                        f"do not split 0..{orig_layers - 1}")
    for e in layers:
        where = f"layer {e.get('output_layer')}"
        sorted_indices(e.get("mlp_kept"), orig_cfg.intermediate_size, cfg.intermediate_size,
                       f"{where} mlp_kept", failures)
        sorted_indices(e.get("kv_heads_kept"), orig_cfg.num_kv_heads, cfg.num_kv_heads,
                       f"{where} kv_heads_kept", failures)
    for key in ("hidden_size", "head_dim", "n_rep", "rms_norm_eps", "rope_theta"):
        if getattr(cfg, key) != getattr(orig_cfg, key):
            failures.append(f"pruned {key} is {getattr(cfg, key)}, the original's is "
                            f"{getattr(orig_cfg, key)}")
    return layers


def run(original_dir: Path, pruned_dir: Path, report_path: Path, layer: int,
        seed: int) -> tuple[dict, list[str]]:
    failures: list[str] = []
    original_config = load_json(original_dir / "config.json")
    pruned_config = load_json(pruned_dir / "config.json")
    orig_cfg = LayerConfig.from_config(original_config, require_head_dim=False)
    cfg = LayerConfig.from_config(pruned_config, require_head_dim=True)
    for config, where in ((original_config, "original"), (pruned_config, "pruned")):
        if type(config.get("num_hidden_layers")) is not int:
            raise Fatal(f"{where} config.json has no integer num_hidden_layers")
    if not 0 <= layer < pruned_config["num_hidden_layers"]:
        raise Fatal(f"--layer {layer} is not a layer of the pruned model "
                    f"(num_hidden_layers = {pruned_config['num_hidden_layers']})")
    layers = check_report(load_json(report_path).get("structured"), original_config,
                          pruned_config, orig_cfg, cfg, failures)
    entry = next((e for e in layers if e.get("output_layer") == layer), None)
    if entry is None:
        raise Fatal(f"report.json has no entry with output_layer {layer}")
    source = entry.get("source_layer")
    if type(source) is not int or not 0 <= source < original_config["num_hidden_layers"]:
        raise Fatal(f"report.json: output layer {layer} has source_layer {source!r}")

    original = load_checkpoint(original_dir).tensors
    pruned = load_checkpoint(pruned_dir).tensors
    checked = check_shapes(pruned, cfg, pruned_config["num_hidden_layers"], failures)
    check_shapes(original, orig_cfg, original_config["num_hidden_layers"], failures)
    if failures:
        return {"ok": False, "layer": layer, "source_layer": source}, failures

    x = np.random.default_rng(seed).standard_normal((TOKENS, cfg.hidden_size))
    full = layer_weights(original, source)
    out_pruned = decoder_layer(x, layer_weights(pruned, layer), cfg)
    out_zeroed = decoder_layer(x, zero_removed(full, orig_cfg, entry["mlp_kept"],
                                               entry["kv_heads_kept"]), orig_cfg)
    out_full = decoder_layer(x, full, orig_cfg)
    difference = float(np.max(np.abs(out_pruned - out_zeroed)))
    effect = float(np.max(np.abs(out_full - out_zeroed)))
    if not np.allclose(out_pruned, out_zeroed, rtol=RTOL, atol=ATOL):
        failures.append(f"pruned layer {layer} differs from source layer {source} with the "
                        f"removed parts zeroed: max |difference| {difference:.3e}")
    if not effect > MIN_EFFECT:
        failures.append(f"zeroing the removed parts of layer {source} changes its output by only "
                        f"{effect:.3e}: nothing that matters was removed")
    summary = {
        "ok": not failures,
        "layer": layer,
        "source_layer": source,
        "seed": seed,
        "max_abs_difference": difference,
        "removed_effect": effect,
        "mlp_neurons_removed": orig_cfg.intermediate_size - len(entry["mlp_kept"]),
        "kv_heads_removed": orig_cfg.num_kv_heads - len(entry["kv_heads_kept"]),
        "shapes_checked": checked,
    }
    return summary, failures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original", required=True, type=Path,
                        help="the checkpoint before pruning")
    parser.add_argument("--pruned", required=True, type=Path,
                        help="the pruned checkpoint, dense, with config.json and report.json")
    parser.add_argument("--layer", required=True, type=int, help="layer index in the pruned model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random hidden state")
    parser.add_argument("--report", type=Path,
                        help="the report.json of the pruning (default: PRUNED_DIR/report.json)")
    args = parser.parse_args(argv)
    for path in (args.original, args.pruned):
        if not path.is_dir():
            parser.error(f"{path} is not a directory")
    report = args.report or args.pruned / "report.json"
    try:
        summary, failures = run(args.original, args.pruned, report, args.layer, args.seed)
    except Fatal as err:
        summary, failures = {"ok": False, "layer": args.layer}, [str(err)]
    print(json.dumps(summary, indent=2))
    if failures:
        print(f"llama_forward: FAILED ({len(failures)} failures):", file=sys.stderr)
        for failure in failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    print(f"llama_forward: OK, pruned layer {args.layer} matches source layer "
          f"{summary['source_layer']} (max |difference| {summary['max_abs_difference']:.3e}, "
          f"removed parts change it by {summary['removed_effect']:.3e})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
