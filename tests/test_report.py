"""peel.report's tables beyond Table III, on hand-made rows (no training)."""

from __future__ import annotations

from peel.report import block_summary, hyperparameter_rows, markdown, to_csv


def row(method: str, seed: int, recall: float, **detail: object) -> dict:
    return {"dataset": "toy", "method": method, "budget": "0.5", "budget_bytes": 500,
            "bytes_used": 400, "metrics": {"recall@20": recall}, "detail": detail,
            "run": f"r{seed}", "seed": seed, "full_table_bytes": 1000}


def test_runs_of_several_seeds_keep_one_row_each() -> None:
    rows = [row("PEEL", 0, 0.25), row("PEEL", 1, 0.5), row("LightGCN", 0, 0.125)]
    md = markdown(rows)
    assert "PEEL [seed 0]" in md and "PEEL [seed 1]" in md and "0.2500" in md
    assert "| LightGCN |" in md  # one seed only: no suffix
    assert to_csv(rows).count("\n") == 4  # header + one line per row, seed column included


def test_blocks_kept_summary_and_chosen_settings() -> None:
    kept = {"0": [3, 1, 1, 1], "1": [2, 2, 1, 1]}
    summary = block_summary([row("PEEL", 0, 0.2, blocks_per_item_group=kept)])
    assert (summary[0]["one_block_min"], summary[0]["one_block_max"]) == (2, 3)
    assert (summary[0]["top_group_min"], summary[0]["top_group_max"]) == (2, 3)
    tuning = {"space": {"lr": [0.1, 0.2]}, "trials": 2, "chosen_trial": 1,
              "chosen": {"lr": 0.2}, "valid_recall@20": 0.3,
              "log": [{"valid_recall@20": 0.1}, {"valid_recall@20": 0.3}]}
    hyper = hyperparameter_rows([row("PMF", 0, 0.2, dim=8, tuning=tuning),
                                 row("BPR-MF", 0, 0.2, dim=8),
                                 row("PEEL", 0, 0.2, blocks_per_item_group=kept)])
    assert [(h["method"], h["tuned"]) for h in hyper] == [("PMF", "yes"), ("BPR-MF", "no")]
    assert hyper[0]["chosen"] == '{"lr": 0.2}' and hyper[0]["default_valid_recall@20"] == 0.1
