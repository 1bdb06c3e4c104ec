"""RULE's search length on the validation split: does a longer evolution find better masks?

    python benchmarks/rule_search_valid.py RUN --budgets 0.107,0.213 --cycles 50,200,1000 \
        --out docs/results/ml-1m/rule/search_cycles_valid.json

For each budget it labels RULE's random configurations once (the same ones ``Rule.fit``
draws for the run's seed), trains the same estimator, then runs the regularised evolution
with each ``--cycles`` (population 20, sample 5), each from one fixed seed (a stream of its
own, not fit's), and measures every winner on the labelling users (validation). Validation
only: no test figure is computed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np


def main() -> None:
    from peel.baselines.rule import (
        Budgeter,
        Estimator,
        Rule,
        RuleConfig,
        ValidationLabeller,
        mutate,
        pick_eval_users,
        random_config,
        regularized_evolution,
        spearman,
    )
    from peel.budget import full_table_bytes, parse_budget
    from peel.package import DEFAULT_SCALE
    from peel.pipeline import load_run_config, run_data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--budgets", default="0.107,0.213")
    ap.add_argument("--cycles", default="50,200,1000")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cfg = load_run_config(args.run)
    data = run_data(args.run)
    rule = Rule.from_run(args.run, cfg.pretrain)
    rc: RuleConfig = rule.rule
    user_emb, item_emb, groups = rule._stage1(data)
    d = cfg.pretrain.block_dim
    n_groups = int(groups.max()) + 1
    full = full_table_bytes(data.n_items, cfg.pretrain.dim)
    users = pick_eval_users(data, rc.eval_users, rule.seed)
    lab = ValidationLabeller(data, user_emb, item_emb, groups, d, users, rc.k, DEFAULT_SCALE)
    out: dict = {"run": str(args.run), "seed": rule.seed, "split": "valid",
                 "eval_users": len(users), "budgets": {}}
    for b in args.budgets.split(","):
        budget = parse_budget(b, full)
        bud = Budgeter(groups, n_groups, item_emb.shape[1] // d, d, DEFAULT_SCALE)
        rng = np.random.default_rng([rule.seed, budget])
        torch_seed = int(rng.integers(2**62))
        masks = np.stack([random_config(rng, bud, budget, fill=bool(rng.random() < rc.full_share))
                          for _ in range(rc.n_configs)])
        labels = np.array([lab.recall(m) for m in masks])
        n_test = max(2, round(rc.holdout * len(masks)))
        held = rng.permutation(len(masks))
        est = Estimator(rc, masks[0].size, torch_seed).fit(masks[held[n_test:]],
                                                           labels[held[n_test:]])
        row = {"estimator_spearman": spearman(est.predict(masks[held[:n_test]]),
                                              labels[held[:n_test]]),
               "best_labelled": float(labels.max()), "searches": {}}
        for cycles in (int(c) for c in args.cycles.split(",")):
            srng = np.random.default_rng([rule.seed, budget, 1])
            evo = regularized_evolution(
                fitness=lambda m, e=est: float(e.predict(m[None])[0]),
                init=lambda r=srng, bb=bud, x=budget: random_config(r, bb, x, fill=True),
                mutation=lambda m, r=srng, bb=bud, x=budget: mutate(m, r, bb, x),
                rng=srng, **{k: v for k, v in vars(replace(rc, cycles=cycles)).items()
                             if k in ("population", "cycles", "sample")})
            row["searches"][str(cycles)] = {"predicted": evo.best_fitness,
                                            "measured": lab.recall(evo.best)}
            print(b, cycles, row["searches"][str(cycles)], flush=True)
        out["budgets"][b] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
