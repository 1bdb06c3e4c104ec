"""Negative sampling speed: the bit-matrix membership test against the binary search it replaced.

DNS draws 32 candidates per positive and asks, for each, whether it is one of the user's
training items. Both ways answer identically (so the negatives a seed draws do not change; a
property test in tests/test_pretrain.py checks it); this times them in the same run on a
dataset's training split and writes the ratio.

    python benchmarks/sampler_speed.py --data ../shared/datasets/gowalla --out FILE.json
        [--batches 20] [--candidates 32] [--batch-size 8192]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from peel.data import load_dataset
from peel.pretrain import NegativeSampler


def seconds_per_batch(sampler: NegativeSampler, users: np.ndarray, batches: int, k: int,
                      batch_size: int) -> list[float]:
    rng = np.random.default_rng(0)
    times = []
    for b in range(batches):
        batch = users[b * batch_size : (b + 1) * batch_size]
        t0 = time.perf_counter()
        sampler.sample(batch, k, rng)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8192)
    args = ap.parse_args()
    data = load_dataset(args.data)
    users = np.random.default_rng(1).permutation(data.train.tocoo().row.astype(np.int64))
    bitset, search = NegativeSampler(data.train), NegativeSampler(data.train, bitset_limit=0)
    assert bitset.bits is not None, "the bit matrix does not fit the default limit here"
    out = {"data": args.data, "train_pairs": int(data.train.nnz),
           "users": data.n_users, "items": data.n_items, "batch_size": args.batch_size,
           "candidates": args.candidates, "batches": args.batches,
           "bit_matrix_mb": bitset.bits.nbytes / 2**20}
    same = np.array_equal(
        bitset.sample(users[: args.batch_size], args.candidates, np.random.default_rng(5)),
        search.sample(users[: args.batch_size], args.candidates, np.random.default_rng(5)))
    for name, sampler in (("binary_search", search), ("bit_matrix", bitset)):
        t = seconds_per_batch(sampler, users, args.batches, args.candidates, args.batch_size)
        out[f"{name}_ms_median"] = 1000 * statistics.median(t)
    out["speedup"] = out["binary_search_ms_median"] / out["bit_matrix_ms_median"]
    out["same_negatives"] = bool(same)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
