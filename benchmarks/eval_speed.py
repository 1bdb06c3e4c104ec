"""Full-ranking evaluation speed on gowalla's test split (29,858 users x 40,981 items).

Scores every test user against every item with a dot-product model, masks train+valid items,
takes the top 50 and computes Recall/NDCG@20/50. Embeddings are random (speed does not depend on
their values). In the same run it times a naive reference (one user at a time, numpy) on a sample
of users and reports the ratio, so the figure is comparable across machines.

    python benchmarks/eval_speed.py [--dims 64 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from peel.data import load_dataset
from peel.eval import dot_scorer, evaluate


def naive_per_user(user_emb: np.ndarray, item_emb: np.ndarray, data, users: np.ndarray) -> float:
    """Seconds per user for the straightforward loop many research codebases use."""
    seen = data.seen_matrix("test")
    t0 = time.perf_counter()
    for u in users:
        s = item_emb @ user_emb[u]
        s[seen.indices[seen.indptr[u] : seen.indptr[u + 1]]] = -np.inf
        top = np.argpartition(-s, 50)[:50]
        top = top[np.argsort(-s[top])]
        truth = set(data.test.indices[data.test.indptr[u] : data.test.indptr[u + 1]].tolist())
        _ = [i in truth for i in top]
    return (time.perf_counter() - t0) / len(users)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2]
                                          / "shared" / "datasets" / "gowalla"))
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1024)
    args = ap.parse_args(argv)
    data = load_dataset(args.data)
    n_test = int((data.test.getnnz(axis=1) > 0).sum())
    print(f"# {data.name}: {n_test} test users x {data.n_items} items;"
          f" torch threads={torch.get_num_threads()}")
    print(f"{'dim':>4} {'median_s':>9} {'min_s':>7} {'naive_s(est)':>13} {'speedup':>8}")
    rng = np.random.default_rng(0)
    for dim in args.dims:
        u = rng.standard_normal((data.n_users, dim)).astype(np.float32)
        v = rng.standard_normal((data.n_items, dim)).astype(np.float32)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            evaluate(dot_scorer(u, v), data, "test", ks=(20, 50), batch_size=args.batch_size)
            times.append(time.perf_counter() - t0)
        sample = rng.choice(data.n_users, size=500, replace=False)
        naive = naive_per_user(u, v, data, sample) * n_test
        med = statistics.median(times)
        print(f"{dim:4d} {med:9.2f} {min(times):7.2f} {naive:13.1f} {naive / med:7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
