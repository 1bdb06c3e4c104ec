"""Two versions of the device runtime on the same synthetic packages, interleaved in one process.

    python benchmarks/device_kernel_compare.py OLD_SRC [--items 91599]

OLD_SRC is another checkout's ``src`` folder (e.g. ``git worktree add /tmp/old REV``, then
``/tmp/old/src``); its ``peel/device.py`` is loaded beside this checkout's. For each precision and
budget it prints the largest relative score difference over 30 users, whether the top-50 lists are
identical, and the CPU time per user of each version, timed twice in alternation (old, new, old,
new) so that load from neighbours hits both. Prints figures, never asserts.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import importlib.util
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peel.device as new
from device_latency import BenchConfig, synthetic
from peel.budget import full_table_bytes
from peel.package import DeployOptions, build_package


def load_old(src: str):
    spec = importlib.util.spec_from_file_location("old_device", Path(src) / "peel" / "device.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_device"] = module
    spec.loader.exec_module(module)
    return module


def cpu_ms(pkg, users: np.ndarray, exclude: np.ndarray) -> float:
    t0 = time.thread_time()
    for x in users:
        pkg.rank(x, 50, exclude)
    return (time.thread_time() - t0) / len(users) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("old_src")
    parser.add_argument("--items", type=int, default=BenchConfig.n_items)
    parser.add_argument("--precisions", default="int4r25,int8s,int4s")
    args = parser.parse_args()
    old = load_old(args.old_src)
    cfg = replace(BenchConfig(), n_items=args.items)
    arrays = synthetic(cfg)
    exclude = np.arange(40)
    print(f"{args.items:,} items, one thread, CPU ms per user (top-50), old vs new, timed twice")
    for prec in args.precisions.split(","):
        for frac in (0.107, 0.533):
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "p.peel")
                build_package(path, arrays, int(frac * full_table_bytes(cfg.n_items, 128)),
                              group=0, options=DeployOptions(precision=prec))
                a, b = new.open_package(path), old.open_package(path)
                u = arrays.user_emb[:30]
                sa = np.stack([a.scores(x) for x in u])
                sb = np.stack([b.scores(x) for x in u])
                same = all(a.rank(x, 50, exclude).items.tolist()
                           == b.rank(x, 50, exclude).items.tolist() for x in u)
                users = arrays.user_emb[:200]
                cpu_ms(a, users[:10], exclude), cpu_ms(b, users[:10], exclude)  # warm-up
                t_old1, t_new1 = cpu_ms(b, users, exclude), cpu_ms(a, users, exclude)
                t_old2, t_new2 = cpu_ms(b, users, exclude), cpu_ms(a, users, exclude)
                rel = float(np.abs(sa - sb).max() / np.abs(sb).max())
                print(f"{prec:>8} {frac:.3f}  max rel diff {rel:.2e}  same top-50 {same}  "
                      f"old {t_old1:.3f} / {t_old2:.3f}  new {t_new1:.3f} / {t_new2:.3f}",
                      flush=True)


if __name__ == "__main__":
    main()
