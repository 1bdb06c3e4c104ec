"""The compression baselines DLRM-CE and LightRec (issue 16): byte accounting, device ranking,
the straight-through codes, and the CLI path. The shared contract is in test_contract.py."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peel import device_compressed as dc
from peel.baselines import DLRMCE, REGISTRY, LightRec, LightRecOptions, QROptions
from peel.baselines.lightrec import CodebookItems
from peel.budget import BudgetError, full_table_bytes
from peel.data import InteractionData
from peel.eval import metrics_from_topk
from peel.pretrain import PretrainConfig, PretrainResult, save_result
from test_contract import SMALL_PRETRAIN, K, planted, popularity_recall

CFG = dataclasses.replace(SMALL_PRETRAIN, epochs=15)


@pytest.fixture(scope="module")
def data() -> InteractionData:
    return planted()


@pytest.fixture(scope="module")
def teacher(data: InteractionData) -> tuple[np.ndarray, np.ndarray]:
    """A small full-size model to distil from (what a run's stage 1 provides)."""
    from peel.pretrain import pretrain

    result = pretrain(data, CFG, progress=False)
    return result.user_emb, result.item_emb


# --------------------------------------------------------------------------- byte accounting


def qr_formula(n_items: int, m: int, dim: int, op: str) -> int:
    """Written out independently of the library: two tables and one user vector."""
    width = dim // 2 if op == "concat" else dim
    return (math.ceil(n_items / m) + m) * width * 4 + dim * 4


@settings(max_examples=60, deadline=None)
@given(n_items=st.integers(1, 5000), dim=st.sampled_from([2, 8, 16, 128]),
       frac=st.floats(0.001, 1.5), op=st.sampled_from(dc.QR_OPS))
def test_qr_plan_is_the_smallest_m_that_fits(n_items: int, dim: int, frac: float,
                                             op: str) -> None:
    budget = max(1, int(frac * full_table_bytes(n_items, dim)))
    try:
        m, d = dc.qr_plan(budget, n_items, dim, op)
    except BudgetError:  # then nothing fits, even at the smallest width
        small = 2 if op == "concat" else 1
        assert all(qr_formula(n_items, m, small, op) > budget for m in range(1, n_items + 1))
        return
    used = dc.qr_bytes(n_items, m, d, op)
    assert used == qr_formula(n_items, m, d, op) <= budget
    if d == dim:  # nothing with more rows fits
        assert m == 1 or qr_formula(n_items, m - 1, d, op) > budget
    else:  # lowered only because no m fits at the full width
        assert all(qr_formula(n_items, mm, dim, op) > budget for mm in range(1, n_items + 1))


@settings(max_examples=60, deadline=None)
@given(n_items=st.integers(1, 50_000), dim=st.sampled_from([4, 16, 128]),
       frac=st.floats(0.001, 2.0), k=st.sampled_from([8, 256]))
def test_lightrec_plan_is_the_most_codebooks_that_fit(n_items: int, dim: int, frac: float,
                                                      k: int) -> None:
    budget = max(1, int(frac * full_table_bytes(n_items, dim)))
    kk = min(k, n_items)
    try:
        books, d = dc.lightrec_plan(budget, n_items, dim, k)
    except BudgetError:
        assert n_items + kk * 4 + 4 > budget  # not even one 1-d codebook
        return
    formula = lambda b, dd: n_items * b + b * kk * dd * 4 + dd * 4  # noqa: E731
    assert dc.lightrec_bytes(n_items, books, kk, d) == formula(books, d) <= budget
    if d == dim:
        assert formula(books + 1, d) > budget
    else:
        assert books == 1 and formula(1, dim) > budget and formula(1, d + 1) > budget


def test_paper_budgets_on_ml1m_sizes() -> None:
    """The values the results report for ml-1m (3,628 items, d = 128)."""
    full = full_table_bytes(3628, 128)
    plans = {f: (dc.qr_plan(int(f * full), 3628, 128), dc.lightrec_plan(int(f * full), 3628, 128))
             for f in (0.107, 0.213, 0.533)}
    assert plans == {0.107: ((10, 128), (1, 128)), 0.213: ((5, 128), (2, 128)),
                     0.533: ((2, 128), (7, 128))}


@pytest.mark.parametrize("frac", [0.3, 0.45, 0.7])
def test_fitted_models_fit_their_budget_byte_exactly(data: InteractionData, frac: float,
                                                     teacher) -> None:
    """Three budgets: what the model stores (its device arrays + one user vector) is exactly
    bytes_used, by the formula, and never above the budget."""
    budget = int(frac * full_table_bytes(data.n_items, CFG.dim))
    qr = DLRMCE(CFG).fit(data, budget)
    lr = LightRec.from_embeddings(*teacher, CFG, LightRecOptions(codewords=8)).fit(data, budget)
    for model in (qr, lr):
        stored = sum(a.nbytes for a in model.arrays.values()) + model.user_emb.shape[1] * 4
        assert stored == model.bytes_used <= budget
        assert model.params["dim"] == CFG.dim and not model.params["dim_lowered"]
    assert qr.bytes_used == qr_formula(data.n_items, qr.params["m"], CFG.dim, "mult")
    assert qr.params["m"] > 1  # the budgets force sharing
    assert lr.arrays["codes"].dtype == np.uint8
    assert lr.bytes_used == (data.n_items * lr.params["codebooks"]
                             + lr.params["codebooks"] * 8 * CFG.dim * 4 + CFG.dim * 4)


# --------------------------------------------------------------------------- device scoring


@settings(max_examples=40, deadline=None)
@given(n_items=st.integers(1, 300), m=st.integers(1, 40), op=st.sampled_from(dc.QR_OPS),
       seed=st.integers(0, 10**6))
def test_qr_scores_equal_the_composed_table(n_items: int, m: int, op: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = min(m, n_items)
    dq, dr = dc.qr_table_dims(8, op)
    q = rng.normal(size=(-(-n_items // m), dq)).astype(np.float32)
    r = rng.normal(size=(m, dr)).astype(np.float32)
    users = rng.normal(size=(3, 8)).astype(np.float32)
    table = dc.qr_compose(q, r, n_items, op)
    expect = np.empty_like(table)
    for i in range(n_items):  # straight from the definition
        a, b = q[i // m], r[i % m]
        expect[i] = a * b if op == "mult" else a + b if op == "add" else np.r_[a, b]
    np.testing.assert_array_equal(table, expect)
    np.testing.assert_allclose(dc.qr_scores(users, q, r, n_items, op), users @ table.T,
                               rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(n_items=st.integers(1, 300), books=st.integers(1, 5), k=st.integers(1, 256),
       seed=st.integers(0, 10**6))
def test_lightrec_lookup_scores_equal_the_composed_table(n_items: int, books: int, k: int,
                                                         seed: int) -> None:
    rng = np.random.default_rng(seed)
    cb = rng.normal(size=(books, k, 6)).astype(np.float32)
    codes = rng.integers(0, k, size=(n_items, books)).astype(np.uint8)
    users = rng.normal(size=(4, 6)).astype(np.float32)
    table = dc.lightrec_compose(cb, codes)
    expect = sum(cb[b][codes[:, b]] for b in range(books))
    np.testing.assert_allclose(table, expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dc.lightrec_scores(users, cb, codes), users @ table.T,
                               rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(n_items=st.integers(1, 9000), dim=st.integers(1, 20),
       kind=st.sampled_from(["fp16", "int8", "int4"]), seed=st.integers(0, 10**6))
def test_quantized_scores_equal_the_decoded_table(n_items: int, dim: int, kind: str,
                                                  seed: int) -> None:
    """A row-wise quantised fixed-size table ranks as its decoded values (what the
    lightgcn-fp16 / -int8 / -int4 models score with), chunk borders included."""
    from peel.baselines.lightgcn_quantized import device_table
    from peel.budget import KIND_F16, KIND_I4, KIND_I8
    from peel.quantize import encode

    code = {"fp16": KIND_F16, "int8": KIND_I8, "int4": KIND_I4}[kind]
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(n_items, dim)) * rng.uniform(0.01, 3, size=(n_items, 1))
    encoded = encode(table, code)
    stored = device_table(encoded)
    assert sum(a.nbytes for a in stored.values()) == encoded.nbytes
    users = rng.normal(size=(3, dim)).astype(np.float32)
    got = dc.quantized_scores(users, code, stored["values"], stored.get("scale"), dim)
    np.testing.assert_allclose(got, users @ encoded.decoded.T.astype(np.float32),
                               rtol=1e-4, atol=1e-4)


def test_quantized_scores_refuse_a_missing_or_stray_scale() -> None:
    from peel.budget import KIND_F16, KIND_F32, KIND_I8

    codes = np.zeros((4, 10), dtype=np.int8)
    with pytest.raises(ValueError, match="scale"):
        dc.quantized_scores(np.ones(4), KIND_I8, codes, None, 4)
    with pytest.raises(ValueError, match="scale"):
        dc.quantized_scores(np.ones(4), KIND_F16, codes.astype(np.float16),
                            np.ones(10, np.float16), 4)
    with pytest.raises(ValueError, match="kind"):
        dc.quantized_scores(np.ones(4), KIND_F32, codes, None, 4)


@settings(max_examples=60, deadline=None)
@given(n_items=st.integers(1, 80), k=st.integers(1, 90), seed=st.integers(0, 10**6),
       ties=st.booleans())
def test_top_k_is_a_stable_sort_with_exclusions(n_items: int, k: int, seed: int,
                                                ties: bool) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(5, n_items)).astype(np.float32)
    if ties:
        scores = np.round(scores)  # many equal scores: lower index must win
    excluded = [np.flatnonzero(rng.random(n_items) < 0.3) for _ in range(5)]
    indptr = np.r_[0, np.cumsum([len(e) for e in excluded])]
    got = dc.top_k(scores, k, indptr, np.concatenate(excluded))
    for row in range(5):
        keep = np.setdiff1d(np.arange(n_items), excluded[row])
        order = keep[np.argsort(-scores[row, keep], kind="stable")][:k]
        want = np.full(min(k, n_items), -1)
        want[: len(order)] = order
        np.testing.assert_array_equal(got[row], want)


def test_device_ranking_imports_numpy_only(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from peel import device_compressed as dc\n"
        "u = np.ones((2, 8), dtype=np.float32)\n"
        "q, r = np.ones((5, 8), dtype=np.float32), np.ones((4, 8), dtype=np.float32)\n"
        "dc.top_k(dc.qr_scores(u, q, r, 20), 5)\n"
        "cb = np.ones((2, 16, 8), dtype=np.float32)\n"
        "dc.top_k(dc.lightrec_scores(u, cb, np.zeros((20, 2), dtype=np.uint8)), 5)\n"
        "s = np.ones(20, dtype=np.float16)\n"
        "dc.top_k(dc.quantized_scores(u, 4, np.ones((4, 20), dtype=np.int8), s, 8), 5)\n"
        "bad = sorted(m for m in ('torch', 'scipy', 'sklearn', 'pandas') if m in sys.modules)\n"
        "print('LOADED', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert "LOADED []" in out.stdout, out.stdout + out.stderr


# --------------------------------------------------------------------------- the models


@pytest.fixture(scope="module")
def fitted(data: InteractionData, teacher) -> dict[str, DLRMCE | LightRec]:
    budget = int(0.35 * full_table_bytes(data.n_items, CFG.dim))
    return {"dlrm-ce": DLRMCE(CFG).fit(data, budget),
            "lightrec": LightRec.from_embeddings(*teacher, CFG,
                                                 LightRecOptions(codewords=8)).fit(data, budget)}


@pytest.mark.parametrize("name", ["dlrm-ce", "lightrec"])
def test_compressed_model_ranks_like_its_scores_and_beats_popularity(
        name: str, fitted: dict, data: InteractionData) -> None:
    model = fitted[name]
    users = np.flatnonzero(data.test.getnnz(axis=1) > 0)
    ranked = model.rank(users, k=K)
    # rank() (the device path) agrees with the dot product of the table the arrays represent
    table_scores = model.user_emb[users] @ model.item_table().T
    table_scores[data.seen_matrix("test")[users].nonzero()] = -np.inf
    np.testing.assert_array_equal(ranked, np.argsort(-table_scores, axis=1, kind="stable")[:, :K])
    recall = metrics_from_topk(ranked, users, data.test, (K,))[f"recall@{K}"].mean()
    assert recall > popularity_recall(data, users) + 0.05, (name, recall)


def test_straight_through_codes_are_hard_forward_and_learn(teacher) -> None:
    items = teacher[1]
    gen = torch.Generator().manual_seed(0)
    model = CodebookItems(items, 3, 8, LightRecOptions(codewords=8, tau=0.5), 0.1, gen)
    ids = torch.arange(len(items))
    soft = model.vectors(ids)
    np.testing.assert_allclose(soft.detach().numpy(), model.table().numpy(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(model.table().numpy(),
                               dc.lightrec_compose(**model.device_arrays()), rtol=1e-5,
                               atol=1e-6)
    # the loss reaches every codebook through the relaxed assignment, not only chosen rows
    soft.sum().backward()
    grad = model.codebooks.grad
    assert grad is not None and bool((grad.abs().sum(dim=2) > 0).all())


def test_straight_through_gradient_is_the_references(teacher) -> None:
    """Same codebook gradient as LightRec's ``(onehot + soft - stop(soft)) @ C`` per level."""
    items = torch.from_numpy(teacher[1][:40])
    gen = torch.Generator().manual_seed(1)
    model = CodebookItems(teacher[1], 2, 8, LightRecOptions(codewords=8, tau=0.7), 0.1, gen)
    weight = torch.randn(items.shape, generator=gen)
    (model.encode(items, hard=False)[0] * weight).sum().backward()
    ours = model.codebooks.grad.clone()
    books = model.codebooks.detach().clone().requires_grad_(True)
    out, res = torch.zeros_like(items), items
    for book in books:
        logits = (2 * res @ book.T - book.pow(2).sum(1)) / 0.7
        soft = torch.softmax(logits, dim=1)
        onehot = torch.nn.functional.one_hot(logits.argmax(1), 8).to(soft.dtype)
        chosen = (onehot + soft - soft.detach()) @ book
        out, res = out + chosen, res - chosen
    (out * weight).sum().backward()
    torch.testing.assert_close(ours, books.grad, rtol=1e-4, atol=1e-5)


def test_more_codebooks_reconstruct_the_teacher_better(teacher) -> None:
    items = teacher[1]
    errors = []
    for books in (1, 2, 4):
        gen = torch.Generator().manual_seed(0)
        model = CodebookItems(items, books, 8, LightRecOptions(codewords=8), 0.1, gen)
        errors.append(float(((model.table().numpy() - items) ** 2).sum()))
    assert errors[0] > errors[1] > errors[2]


def test_lowered_dimension_is_reported(data: InteractionData, teacher) -> None:
    """A budget below one 16-d codebook of 8 codewords: d drops and params say so."""
    budget = data.n_items + 8 * 6 * 4 + 6 * 4  # one codebook at d = 6
    model = LightRec.from_embeddings(*teacher, CFG, LightRecOptions(codewords=8))
    model.fit(data, budget)
    assert model.params["dim_lowered"] and model.params["dim"] == 6
    assert model.bytes_used == budget and model.user_emb.shape[1] == 6
    # no m fits at d = 16 (16 rows at best: 1,088 B); at d = 3, m = 6 gives 10 + 6 rows
    qr = DLRMCE(CFG).fit(data, 208)
    assert qr.params["dim_lowered"] and (qr.params["dim"], qr.params["m"]) == (3, 6)
    assert qr.bytes_used == qr_formula(data.n_items, 6, 3, "mult") == 204


def test_search_spaces_name_pretrain_fields() -> None:
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    for cls in (DLRMCE, LightRec):
        assert cls.search_space and set(cls.search_space) <= fields
        assert all(isinstance(v, tuple) and v for v in cls.search_space.values())


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="op"):
        DLRMCE(CFG, QROptions(op="max"))
    with pytest.raises(ValueError, match="remainder_init"):
        DLRMCE(CFG, QROptions(remainder_init="zeros"))
    with pytest.raises(ValueError, match="codewords"):
        LightRec(CFG, LightRecOptions(codewords=300))
    with pytest.raises(ValueError, match="teacher"):
        LightRec.from_embeddings(np.zeros((3, 16)), np.zeros((4, 16)), CFG).fit(planted(), 10**6)


def test_evaluate_cli_runs_both_and_lightrec_uses_the_runs_stage1(
        tmp_path: Path, data: InteractionData, teacher, capsys) -> None:
    """``peel evaluate --baselines dlrm-ce,lightrec`` path, through pipeline.evaluate_baselines
    with a run folder whose stage 1 is the teacher."""
    from peel.baselines import make_baseline
    from peel.pipeline import RunConfig, evaluate_baselines

    run = tmp_path / "run"
    save_result(PretrainResult(teacher[0], teacher[1], CFG), run / "pretrain")
    lr = make_baseline("lightrec", CFG, run=run)
    assert isinstance(lr, LightRec) and lr.teacher_source.endswith("pretrain")
    cfg = dataclasses.replace(RunConfig(), pretrain=CFG)
    rows = evaluate_baselines(data, cfg, ["0.3"], progress=False, methods=["dlrm-ce", "lightrec"],
                              run=run, split="valid")
    assert [r.method for r in rows] == ["DLRM-CE", "LightRec"]
    assert all(0 < r.bytes_used <= r.budget_bytes for r in rows)
    assert json.dumps([r.detail for r in rows])  # params are JSON-able for eval.json
    assert set(REGISTRY) >= {"dlrm-ce", "lightrec"}
