"""Validation sweep of DLRM-CE / LightRec / ESAPN / AutoEmb settings on a trained run
(decisions only: no test).

    python benchmarks/compress_tune.py RUN --out FILE.jsonl \
        --variants "mult:dlrm-ce:op=mult" "add:dlrm-ce:op=add" \
                   "lr-t1:lightrec:tau=1.0,distill=1.0" "lr-lr3:lightrec:pretrain.lr=0.003" \
        [--budgets 0.107,0.213,0.533]

Each variant is ``label:method:key=value,...``; keys are the method's options
(:class:`peel.baselines.QROptions`, ``LightRecOptions``, ``ESAPNOptions``, ``AutoEmbOptions``) or
``pretrain.FIELD`` for the run's stage-1 config (what the method trains with). Every
(variant, budget) is fitted on the run's data and scored on the VALIDATION split through the
device ranking; one JSON line each (appended, so an interrupted sweep keeps what it did and
skips it when re-run). Test metrics are never computed here.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from peel.overrides import override_fields


def parse_variant(spec: str) -> tuple[str, str, list[str], list[str]]:
    """``label:method:k=v,...`` -> (label, method, option pairs, pretrain pairs)."""
    parts = spec.split(":", 2)
    if len(parts) < 2:
        raise SystemExit(f"variant {spec!r}: expected label:method[:key=value,...]")
    label, method, rest = parts[0], parts[1], parts[2] if len(parts) == 3 else ""
    pairs = [p for p in rest.split(",") if p]
    return (label, method, [p for p in pairs if not p.startswith("pretrain.")],
            [p.removeprefix("pretrain.") for p in pairs if p.startswith("pretrain.")])


def make(method: str, options: list[str], cfg: Any, run: Path) -> Any:
    from peel.baselines import (
        DLRMCE,
        ESAPN,
        AutoEmb,
        AutoEmbOptions,
        ESAPNOptions,
        LightRec,
        LightRecOptions,
        QROptions,
    )

    if method == "dlrm-ce":
        return DLRMCE(cfg, override_fields(QROptions(), options, "dlrm-ce"))
    if method == "lightrec":
        return LightRec.from_run(run, cfg, override_fields(LightRecOptions(), options,
                                                           "lightrec"))
    if method == "esapn":
        return ESAPN(cfg, override_fields(ESAPNOptions(), options, "esapn"))
    if method == "autoemb":
        return AutoEmb(cfg, override_fields(AutoEmbOptions(), options, "autoemb"))
    raise SystemExit(f"unknown method {method!r}: expected dlrm-ce, lightrec, esapn or autoemb")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--budgets", default="0.107,0.213,0.533")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from peel.budget import full_table_bytes, parse_budget
    from peel.eval import evaluate
    from peel.pipeline import load_run_config, run_data

    cfg = load_run_config(args.run)
    data = run_data(args.run, cfg)
    full = full_table_bytes(data.n_items, cfg.pretrain.dim)
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            rec = json.loads(line)
            done.add((rec["variant"], rec["budget"]))
    for spec in args.variants:
        label, method, options, overrides = parse_variant(spec)
        pcfg = override_fields(cfg.pretrain, overrides, "pretrain")
        for budget in args.budgets.split(","):
            if (label, budget) in done:
                continue
            t0 = time.perf_counter()
            model = make(method, options, pcfg, args.run).fit(data, parse_budget(budget, full))
            metrics = evaluate(model.scorer(), data, "valid").metrics
            rec = {"variant": label, "method": method, "options": options,
                   "pretrain": overrides, "budget": budget, "bytes_used": model.bytes_used,
                   "valid": metrics, "params": model.params,
                   "seconds": time.perf_counter() - t0}
            with args.out.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            print(f"{label:<16}{budget:>7}  valid R@20 {metrics['recall@20']:.4f}  "
                  f"best epoch {model.params['best_epoch']}  {rec['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
