"""numpy versions of the kernels `shardpress bench` measures, for its comparison.

usage: numpy_kernels.py INPUT.bf16 ROWS COLS REPS

Reads a row-major bf16 matrix and prints one line per kernel, `KEY GB/s` (input bytes per
second, fastest of REPS runs), where KEY is the preset the Rust kernel implements (or
`decode`). Each kernel does the same work as the Rust one: decode, parameters, rounding,
clamping, packing or selection and bitmask, in plain vectorised numpy.
"""

import sys
import time

import numpy as np


def decode(raw):
    return (raw.astype(np.uint32) << 16).view(np.float32)


def k_decode(raw, rows, cols):
    return decode(raw)


def k_int8_channel(raw, rows, cols):
    w = decode(raw).reshape(rows, cols)
    s = np.abs(w).max(axis=1, keepdims=True) / 127.0
    s[s == 0] = 1.0
    q = np.clip(np.rint(w / s), -128, 127).astype(np.int8)
    return (q.view(np.uint8) ^ 0x80).view(np.uint32), s


def pack4(u):
    u = u.astype(np.uint32).reshape(u.shape[0], -1, 8)
    out = u[:, :, 0].copy()
    for i in range(1, 8):
        out |= u[:, :, i] << (4 * i)
    return out


def k_int4_group(raw, rows, cols, symmetric):
    w = decode(raw).reshape(rows, cols // 128, 128)
    lo = np.minimum(w.min(axis=2, keepdims=True), 0)
    hi = np.maximum(w.max(axis=2, keepdims=True), 0)
    if symmetric:
        s = np.maximum(-lo, hi) / 7.0
        s[s == 0] = 1.0
        z = 0
    else:
        s = (hi - lo) / 15.0
        s[s == 0] = 1.0
        z = np.clip(np.rint(-8 - lo / s), -8, 7)
    q = np.clip(np.rint(w / s) + z, -8, 7) + 8
    return pack4(q.reshape(rows, cols).astype(np.uint8)), s


def k_fp8(raw, rows, cols):
    # Rounds to the e4m3 grid (3 mantissa bits, subnormals below 2^-6), saturating at 448;
    # numpy has no fp8 type, so the result stays a float.
    w = decode(raw).reshape(rows, cols)
    s = np.abs(w).max(axis=1, keepdims=True) / 448.0
    s[s == 0] = 1.0
    y = w / s
    _, e = np.frexp(y)
    e = np.maximum(e - 1, -6)
    step = np.ldexp(np.float32(1.0), e - 3)
    return np.clip(np.rint(y / step) * step, -448, 448), s


def k_magnitude(raw, rows, cols):
    w = decode(raw)
    a = np.abs(w)
    k = w.size // 2
    t = np.partition(a, k)[k]
    keep = a >= t
    return w[keep], np.packbits(keep.reshape(rows, cols), axis=1, bitorder="little")


def k_2of4(raw, rows, cols):
    w = decode(raw)
    a = np.abs(w).reshape(-1, 4)
    order = np.argsort(a, axis=1, kind="stable")
    keep = np.zeros_like(a, dtype=bool)
    np.put_along_axis(keep, order[:, 2:], True, axis=1)
    keep = keep.reshape(rows, cols)
    return w.reshape(rows, cols)[keep], np.packbits(keep, axis=1, bitorder="little")


KERNELS = {
    "decode": k_decode,
    "w8a16": k_int8_channel,
    "w4a16": lambda r, m, n: k_int4_group(r, m, n, True),
    "w4a16-asym": lambda r, m, n: k_int4_group(r, m, n, False),
    "fp8": k_fp8,
    "sparse50": k_magnitude,
    "2of4": k_2of4,
}


def main():
    path, rows, cols, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    raw = np.fromfile(path, dtype="<u2")
    assert raw.size == rows * cols, "input size does not match ROWS x COLS"
    for key, fn in KERNELS.items():
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn(raw, rows, cols)
            best = min(best, time.perf_counter() - t)
        print(f"{key} {raw.nbytes / best / 1e9:.4f}", flush=True)


if __name__ == "__main__":
    main()
