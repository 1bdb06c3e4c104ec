"""Why float16 / int8 ranking stays above the memory-read floor with numpy alone.

Times, on one thread, the numpy operations a float16 or int8 block needs per stored value
(widening int16 / int8 to 32 bits, the shift and mask that turn float16 bits into float32, the
(d, rows) product) against the floor's float32 matrix-vector product, per stored byte, on
flat arrays of ``--mbytes`` MB (warm cache: the best case for every row). Each numpy call is a
full pass over its array, so a float16 value pays for several passes while the floor reads
each byte once. Prints a table; ``--out FILE`` also writes it. CPU time (``thread_time``),
median of ``--reps``; on a shared machine every figure is an upper bound.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/device_primitives.py``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # must precede the numpy import to take effect

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def _median_ms(step: Callable[[], object], reps: int) -> float:
    step()
    times = []
    for _ in range(reps):
        t0 = time.thread_time()
        step()
        times.append(time.thread_time() - t0)
    return float(np.median(times)) * 1e3


def measure(mbytes: float, reps: int, seed: int = 0) -> list[tuple[str, int, float]]:
    """(operation, stored bytes it covers, CPU ms) for arrays holding ``mbytes`` MB."""
    rng = np.random.default_rng(seed)
    nbytes = int(mbytes * 1e6)
    dense = rng.standard_normal((nbytes // 512, 128), dtype=np.float32)
    vec = rng.standard_normal(128, dtype=np.float32)
    n16 = nbytes // 2
    half = np.tanh(rng.standard_normal(n16, dtype=np.float32)).astype(np.float16)
    bits = half.view(np.int16)
    wide = np.empty(n16, dtype=np.int32)
    codes = rng.integers(-127, 128, nbytes, dtype=np.int8)
    floats = np.empty(nbytes, dtype=np.float32)
    q = rng.standard_normal(8, dtype=np.float32)
    np.left_shift(bits, 13, out=wide, dtype=np.int32)
    np.bitwise_and(wide, np.int32(-0x70000001), out=wide)
    rows = [
        ("floor: float32 (rows, 128) @ (128,)", dense.nbytes, lambda: dense @ vec),
        ("float16: numpy astype(float32)", bits.nbytes,
         lambda: np.copyto(floats[:n16], half)),
        ("float16: widen int16 -> int32", bits.nbytes,
         lambda: np.copyto(wide, bits, casting="unsafe")),
        ("float16: widen and shift (one call)", bits.nbytes,
         lambda: np.left_shift(bits, 13, out=wide, dtype=np.int32)),
        ("float16: mask the sign bits", bits.nbytes,
         lambda: np.bitwise_and(wide, np.int32(-0x70000001), out=wide)),
        ("float16: (8, rows) float32 product", bits.nbytes,
         lambda: q @ wide.view(np.float32).reshape(8, -1)),
        ("int8: widen int8 -> float32", codes.nbytes,
         lambda: np.copyto(floats, codes, casting="unsafe")),
        ("int8: (8, rows) float32 product", codes.nbytes,
         lambda: q @ floats.reshape(8, -1)),
    ]
    return [(name, size, _median_ms(step, reps)) for name, size, step in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mbytes", type=float, default=5.0)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = measure(args.mbytes, args.reps)
    floor = rows[0][2] / rows[0][1]
    lines = [f"numpy {np.__version__}, one thread, {args.mbytes:g} MB of stored bytes per "
             f"operation, CPU ms (median of {args.reps}); x floor = ms per stored byte over "
             f"the floor's",
             f"{'operation':<40} {'bytes':>11} {'ms':>8} {'x floor':>8}"]
    lines += [f"{name:<40} {size:>11,} {ms:>8.3f} {ms / size / floor:>8.2f}"
              for name, size, ms in rows]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
