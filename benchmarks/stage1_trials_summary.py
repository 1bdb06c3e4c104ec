"""Validation summary of `[pretrain] trials`: per seed, every stage-1 trial and the deployed PEEL.

    python benchmarks/stage1_trials_summary.py DIR

DIR holds, per seed S, ``stage1_tuning_seedS.json`` (a tuned run's RUN/pretrain/tuning.json),
``precision_valid_seedS.json`` (its RUN/precision.json) and ``precision_valid_seedS_untuned.json``
(the same seed's run with one stage-1 trial). Writes DIR/stage1_valid.md: each trial's
validation Recall@20 and the chosen one, then PEEL's deployed validation Recall@20 at each
budget with the precision rule each run chose. Validation only: decisions may rest on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _deployed(path: Path) -> tuple[str, dict[str, float]]:
    doc = json.loads(path.read_text())
    rule = doc["rule"]
    return rule, {b: doc["results"][rule][b]["recall@20"] for b in doc["budgets"]}


def main() -> None:
    folder = Path(sys.argv[1])
    seeds = sorted(int(p.stem.rsplit("seed", 1)[1])
                   for p in folder.glob("stage1_tuning_seed*.json"))
    lines = ["# Stage 1 with 4 trials against 1 (validation Recall@20)", "",
             "| seed | trial 0 (configured) | trial 1 | trial 2 | trial 3 | chosen |",
             "|---|---|---|---|---|---|"]
    deployed = ["", "| seed | budget | one trial (rule) | 4 trials (rule) | difference |",
                "|---|---|---|---|---|"]
    for seed in seeds:
        doc = json.loads((folder / f"stage1_tuning_seed{seed}.json").read_text())
        scores = [f"{t['valid_recall@20']:.4f}" for t in doc["log"]]
        lines.append(f"| {seed} | " + " | ".join(scores) + f" | {doc['chosen_trial']}: "
                     f"{json.dumps(doc['chosen'], sort_keys=True)} |")
        rule1, one = _deployed(folder / f"precision_valid_seed{seed}_untuned.json")
        rule4, four = _deployed(folder / f"precision_valid_seed{seed}.json")
        for budget in one:
            deployed.append(f"| {seed} | {budget} | {one[budget]:.4f} ({rule1}) | "
                            f"{four[budget]:.4f} ({rule4}) | {four[budget] - one[budget]:+.4f} |")
    out = folder / "stage1_valid.md"
    out.write_text("\n".join(lines + deployed) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
