"""Stage 2: block weights, the unrolled hypergradient, deployed ranking and group outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from peel.data import InteractionData, from_splits
from peel.device import open_package
from peel.elastic import (
    GROUP_ARRAYS,
    Eq10Scorer,
    FinetuneConfig,
    GroupModel,
    LocalBatch,
    RowAdam,
    Triples,
    alpha_from_logits,
    deployed_mask,
    finetune_groups,
    load_group,
    localise,
    normalise_blocks,
)
from peel.executor import SerialExecutor
from peel.groups import GroupConfig, make_item_groups
from peel.package import (
    DeployOptions,
    GroupArrays,
    build_package,
    plan_package,
    synthetic_group,
)
from peel.pretrain import mean_block_distance
from peel.synthetic import SyntheticConfig, make_demo

# --------------------------------------------------------------------------- fixtures


def svd_embeddings(data: InteractionData, k: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Stand-in for pretraining: a scaled truncated SVD of the training matrix."""
    from scipy.sparse.linalg import svds

    u, s, vt = svds(data.train.astype(np.float64), k=k, random_state=0)
    return (u * np.sqrt(s)).astype(np.float32), (vt.T * np.sqrt(s)).astype(np.float32)


def tiered_communities(seed: int = 0) -> tuple[InteractionData, np.ndarray]:
    """Two planted communities living in different popularity tiers of the catalogue.

    Community 0 (150 users) shares 40 items, community 1 (100 users) spreads over 120 others,
    so the popularity-segmented item groups each community uses differ.
    """
    rng = np.random.default_rng(seed)
    community = np.r_[np.zeros(150, np.int64), np.ones(100, np.int64)]
    pools = [np.arange(0, 40), np.arange(40, 160)]
    rows: dict[str, tuple[list[int], list[int]]] = {s: ([], []) for s in ("tr", "va", "te")}
    for user, c in enumerate(community):
        items = rng.choice(pools[c], 16, replace=False)
        for split, part in zip(("tr", "va", "te"), np.split(items, [11, 13]), strict=True):
            rows[split][0].extend([user] * len(part))
            rows[split][1].extend(part.tolist())
    mats = [sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(250, 160)) for r, c in rows.values()]
    return from_splits(*mats), community


#: The paper's stage 2 (pretrained slices, Eq. 4, controller weights): what these tests check.
PAPER = {"init": "pretrained", "transform": "eq4", "importance": "controller",
         "train_budgets": ()}
SMALL = FinetuneConfig(n_blocks=4, block_dim=4, mlp_hidden=16, controller_hidden=16,
                       batch_size=128, max_epochs=3, patience=2, **PAPER)


# --------------------------------------------------------------------------- alpha


@pytest.mark.parametrize(("scale", "total", "row_sum"), [
    ("literal", 1.0, None), ("global", 20.0, None), ("per_group", 20.0, 4.0)])
def test_alpha_shape_non_negative_and_normalised(scale: str, total: float,
                                                 row_sum: float | None) -> None:
    logits = torch.randn(5 * 4, generator=torch.Generator().manual_seed(0)) * 3
    alpha = alpha_from_logits(logits, n_item_groups=5, n_blocks=4, scale=scale)
    assert alpha.shape == (5, 4)
    assert (alpha >= 0).all()
    assert float(alpha.sum()) == pytest.approx(total, rel=1e-5)
    if row_sum is not None:
        np.testing.assert_allclose(alpha.sum(1).numpy(), row_sum, rtol=1e-5)


def test_alpha_layout_is_block_major_as_in_eq7() -> None:
    # alpha^n_g = e_c[G_v * n + g]: raising logit G_v * n + g raises exactly alpha[g, n]
    logits = torch.zeros(5 * 4)
    logits[5 * 3 + 1] = 5.0
    alpha = alpha_from_logits(logits, 5, 4, "literal")
    assert tuple(np.unravel_index(int(alpha.argmax()), (5, 4))) == (1, 3)


def test_bn_scaled_user_init_matches_the_batch_norm_scale() -> None:
    rng = np.random.default_rng(0)
    items, users = rng.normal(size=(30, 6)) * 3, rng.normal(size=(4, 6))
    cfg = FinetuneConfig(n_blocks=3, block_dim=2, user_init="bn_scaled")
    model = GroupModel(items, users, np.arange(30) % 3, np.ones(3) / 3, cfg,
                       torch.Generator().manual_seed(0), torch.float64)
    std = np.sqrt(items.var(0, ddof=1) + cfg.bn_eps)
    np.testing.assert_allclose(model.users.numpy(), users * std, rtol=1e-12)
    # so before tanh, u' . BN(v) = u . (v - mean): the pretrained ranking of every user
    pre = (items - items.mean(0)) / std
    np.testing.assert_allclose(model.users.numpy() @ pre.T,
                               users @ (items - items.mean(0)).T, rtol=1e-9)


@pytest.mark.parametrize(("scale", "value"), [("literal", 1 / 9), ("global", 1.0),
                                              ("per_group", 1.0)])
def test_controller_starts_uniform(scale: str, value: float) -> None:
    model = _tiny_model("dot", torch.float32, alpha_scale=scale)
    np.testing.assert_allclose(model.alpha().detach().numpy(), np.full((3, 3), value),
                               rtol=1e-6)


# --------------------------------------------------------------------------- bi-level step


def _tiny_model(scorer: str, dtype: torch.dtype, xi: float = 0.5,
                alpha_scale: str = "literal") -> GroupModel:
    cfg = FinetuneConfig(n_blocks=3, block_dim=2, scorer=scorer, mlp_hidden=5,
                         controller_hidden=4, xi=xi, alpha_scale=alpha_scale, **PAPER)
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    model = GroupModel(rng.normal(size=(12, 6)), rng.normal(size=(5, 6)), np.arange(12) % 3,
                       np.array([0.5, 0.3, 0.2]), cfg, gen, dtype)
    return model


def _tiny_batches(seed: int = 1) -> tuple[Triples, Triples]:
    rng = np.random.default_rng(seed)
    return tuple(Triples(rng.integers(0, 5, 8), rng.integers(0, 12, 8), rng.integers(0, 12, 8))
                 for _ in range(2))  # type: ignore[return-value]


@pytest.mark.parametrize("scale", ["literal", "per_group"])
@pytest.mark.parametrize("scorer", ["dot", "mlp"])
def test_unrolled_hypergradient_matches_finite_differences(scorer: str, scale: str) -> None:
    model = _tiny_model(scorer, torch.float64, alpha_scale=scale)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move away from the uniform start so every term is non-trivial
        for p in model.controller:
            p.normal_(0, 0.5, generator=gen)
    lb = localise(*_tiny_batches())
    objective = model.unrolled_objective(lb, second_order=True)
    grads = torch.autograd.grad(objective, model.controller)
    direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64)
                 for p in model.controller]
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction, strict=True))

    def at(step: float) -> float:
        shifted = [p.detach() + step * d for p, d in zip(model.controller, direction,
                                                           strict=True)]
        return float(model.unrolled_objective(lb, controller=shifted, second_order=True).detach())

    eps = 1e-5
    numeric = (at(eps) - at(-eps)) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    # the first-order shortcut really drops a term (it is not the same gradient)
    first = torch.autograd.grad(model.unrolled_objective(lb, second_order=False),
                                model.controller)
    approx = sum(float((g * d).sum()) for g, d in zip(first, direction, strict=True))
    assert abs(approx - analytic) > 1e-3 * abs(analytic)


def test_unrolled_step_on_touched_rows_equals_full_table() -> None:
    """Rows outside the training batch have zero gradient, so the sub-table unroll is exact."""
    model = _tiny_model("mlp", torch.float64)
    train, val = _tiny_batches(2)
    local = localise(train, val)
    everything = LocalBatch(torch.arange(12), torch.arange(5), [
        tuple(torch.from_numpy(a) for a in (t.users, t.pos, t.neg)) for t in (train, val)])
    a = model.unrolled_objective(local)
    b = model.unrolled_objective(everything)
    ga = torch.autograd.grad(a, model.controller)
    gb = torch.autograd.grad(b, model.controller)
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-12)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_row_adam_equals_adam_when_every_row_is_updated() -> None:
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(6, 3, generator=gen)
    ref = table.clone().requires_grad_()
    opt = torch.optim.Adam([ref], lr=0.01)
    lazy = RowAdam(table, lr=0.01)
    for _ in range(5):
        grad = torch.randn(6, 3, generator=gen)
        ref.grad = grad.clone()
        opt.step()
        lazy.step(torch.arange(6), grad)
    torch.testing.assert_close(table, ref.detach(), rtol=1e-5, atol=1e-6)
    # rows that are not in a step are not touched
    before = table.clone()
    lazy.step(torch.tensor([1, 4]), torch.ones(2, 3))
    unchanged = [0, 2, 3, 5]
    torch.testing.assert_close(table[unchanged], before[unchanged])


# --------------------------------------------------------------------------- deployed ranking


def test_block_selection_follows_section_iv_c4() -> None:
    """Early stopping's mask: the best block of every item group first, then by weight."""
    alpha = np.array([[0.1, 0.9, 0.5], [0.2, 0.3, 0.25], [0.8, 0.7, 0.6]])
    groups = np.repeat(np.arange(3), 400)
    full = len(groups) * 3 * 4 * 4
    minimum = plan_package(GroupArrays(np.zeros((len(groups), 3, 4), np.float32), alpha,
                                       groups, np.zeros(0, np.int64), np.zeros((0, 12))),
                           10**9, options=DeployOptions(precision="fp32"))  # every block
    assert minimum.total > full  # so "1.0" of the table cannot hold every block ...
    assert deployed_mask(alpha, groups, 4, 1.0).all()  # ... and 1.0 means every block
    one_each = deployed_mask(alpha, groups, 4, 0.4)
    assert one_each.tolist() == [[False, True, False], [False, True, False], [True, False, False]]
    five = deployed_mask(alpha, groups, 4, 0.6)  # then the rest by alpha: 0.7 and 0.6
    assert five.sum() == 5 and five[2].all()
    # below a package's minimum, training still scores one block per item group
    assert deployed_mask(alpha, groups, 4, 0.05).tolist() == one_each.tolist()


def test_early_stopping_mask_is_the_devices_package(tmp_path: Path) -> None:
    """The blocks scored during training are exactly the blocks a built float32 package keeps
    (stage 2 trains for float32 kept sets; mixed-precision packages keep more blocks)."""
    arrays = synthetic_group(n_items=900, n_blocks=6, block_dim=4, n_item_groups=9, seed=3)
    for fraction in (0.3, 0.5, 0.8):
        path = tmp_path / f"p{fraction}.peel"
        build_package(path, arrays, fraction, group=2, options=DeployOptions(precision="fp32"))
        kept = np.zeros(arrays.alpha.shape, dtype=bool)
        for g, blocks in enumerate(open_package(path).block_sets()):
            kept[g, blocks] = True
        mask = deployed_mask(arrays.alpha, arrays.item_group, 4, fraction, group=2)
        np.testing.assert_array_equal(mask, kept)


@pytest.mark.parametrize("scale", ["eq10", "none"])
@pytest.mark.parametrize("similarity", ["aligned", "literal"])
def test_eq10_scorer_matches_the_formula(similarity: str, scale: str) -> None:
    rng = np.random.default_rng(0)
    n_items, n_blocks, d = 7, 3, 2
    blocks = rng.normal(size=(n_items, n_blocks, d)).astype(np.float32)
    item_group = np.array([0, 1, 0, 1, 1, 0, 1])
    mask = np.array([[True, True, True], [False, True, False]])
    users = rng.normal(size=(2, n_blocks * d)).astype(np.float32)
    got = Eq10Scorer(blocks, item_group, mask, similarity, scale=scale)(users).numpy()
    for b in range(2):
        chunks = users[b].reshape(n_blocks, d)
        for j in range(n_items):
            kept = np.flatnonzero(mask[item_group[j]])
            factor = 3 / len(kept) if scale == "eq10" else 1.0  # max_k |S_k| = 3
            total = 0.0
            for n in kept:
                rep = np.tile(blocks[j, n], n_blocks)  # e-bar: the block repeated N times
                if similarity == "aligned":
                    rep = np.zeros(n_blocks * d)
                    rep[n * d:(n + 1) * d] = blocks[j, n]
                total += float(users[b] @ rep)
            assert got[b, j] == pytest.approx(factor * total, rel=1e-5), (b, j, chunks)


# --------------------------------------------------------------------------- group training


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    data = make_demo(SyntheticConfig(n_users=300, n_items=200, seed=0))
    user_emb, item_emb = svd_embeddings(data)
    item_groups = make_item_groups(data.item_popularity, GroupConfig(n_item_groups=5), 0)
    user_groups = np.arange(data.n_users) % 2
    out = tmp_path_factory.mktemp("run")
    summaries = finetune_groups(data, user_emb, item_emb, user_groups, item_groups, SMALL, out,
                                SerialExecutor(progress=False), seed=1)
    return {"data": data, "user_emb": user_emb, "item_emb": item_emb, "out": out,
            "user_groups": user_groups, "item_groups": item_groups, "summaries": summaries}


def test_group_files_have_exactly_the_documented_arrays(demo_run: dict) -> None:
    data = demo_run["data"]
    for g in (0, 1):
        path = Path(demo_run["out"]) / "groups" / f"group_{g:03d}.npz"
        with np.load(path, allow_pickle=False) as npz:
            assert sorted(npz.files) == sorted(GROUP_ARRAYS)
        arrays = load_group(path)
        users = np.flatnonzero(demo_run["user_groups"] == g)
        assert arrays["blocks"].dtype == np.float32
        assert arrays["blocks"].shape == (data.n_items, 4, 4)
        assert np.abs(arrays["blocks"]).max() <= 1.0  # tanh output
        assert arrays["alpha"].dtype == np.float32 and arrays["alpha"].shape == (5, 4)
        assert (arrays["alpha"] >= 0).all()
        scale = SMALL.alpha_scale
        if scale == "per_group":
            np.testing.assert_allclose(arrays["alpha"].sum(1), 4.0, rtol=1e-4)
        else:
            assert arrays["alpha"].sum() == pytest.approx(1.0 if scale == "literal" else 20.0,
                                                          rel=1e-4)
        assert arrays["item_group"].dtype == np.int32
        np.testing.assert_array_equal(arrays["item_group"], demo_run["item_groups"])
        assert arrays["users"].dtype == np.int64
        np.testing.assert_array_equal(arrays["users"], users)
        assert arrays["user_emb"].dtype == np.float32
        assert arrays["user_emb"].shape == (len(users), 16)
        meta = json.loads(path.with_suffix(".json").read_text())
        assert meta["config"]["n_blocks"] == 4 and meta["history"][0]["epoch"] == 0
        assert meta["best_epoch"] >= 1 and meta["seconds"] > 0
        assert "recall@20" in meta["valid"]
    summary = demo_run["summaries"][0]
    assert summary.group == 0 and not summary.skipped and summary.n_users == 150


def test_blocks_are_deployed_form_of_the_table(demo_run: dict) -> None:
    """Blocks = tanh(eval-mode BN(table)): before tanh every dimension is roughly standardised.

    Alpha is not folded in, so no item group's blocks are scaled by its weight.
    """
    arrays = load_group(Path(demo_run["out"]) / "groups" / "group_000.npz")
    blocks = arrays["blocks"].astype(np.float64)
    assert np.abs(blocks).max() < 1.0
    pre = np.arctanh(blocks).reshape(len(blocks), -1)
    assert np.abs(pre.mean(0)).max() < 0.5
    assert pre.var(0).min() > 0.3 and pre.var(0).max() < 3.0
    norms = np.linalg.norm(arrays["blocks"], axis=2).mean(1)
    per_group = np.array([norms[arrays["item_group"] == g].mean() for g in range(5)])
    weight = arrays["alpha"].mean(1)
    assert not np.allclose(per_group / per_group.mean(), weight / weight.mean(), rtol=0.05)


def test_resume_skips_complete_groups_and_redoes_changed_ones(demo_run: dict) -> None:
    args = (demo_run["data"], demo_run["user_emb"], demo_run["item_emb"],
            demo_run["user_groups"], demo_run["item_groups"])
    out = demo_run["out"]
    before = load_group(Path(out) / "groups" / "group_001.npz")
    again = finetune_groups(*args, SMALL, out, SerialExecutor(progress=False), seed=1)
    assert all(s.skipped for s in again)
    assert [s.group for s in again] == [0, 1]
    # a truncated file is not trusted
    (Path(out) / "groups" / "group_001.npz").write_bytes(b"broken")
    redone = finetune_groups(*args, SMALL, out, SerialExecutor(progress=False), seed=1)
    assert [s.skipped for s in redone] == [True, False]
    after = load_group(Path(out) / "groups" / "group_001.npz")
    for key in GROUP_ARRAYS:  # retraining is deterministic
        np.testing.assert_array_equal(before[key], after[key])


def test_test_split_is_never_used(demo_run: dict, tmp_path: Path) -> None:
    data = demo_run["data"]
    blind = from_splits(data.train, data.valid, sp.csr_matrix(data.train.shape))
    finetune_groups(blind, demo_run["user_emb"], demo_run["item_emb"], demo_run["user_groups"],
                    demo_run["item_groups"], SMALL, tmp_path, SerialExecutor(progress=False),
                    seed=1)
    a = load_group(Path(demo_run["out"]) / "groups" / "group_000.npz")
    b = load_group(tmp_path / "groups" / "group_000.npz")
    for key in GROUP_ARRAYS:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize(("scale", "stage2"), [("literal", PAPER), ("global", PAPER),
                                               ("literal", {})])
def test_planted_communities_get_different_alpha(tmp_path: Path, scale: str,
                                                 stage2: dict) -> None:
    """Groups from different communities get different weights; halves of one do not.

    Dot scorer, the controller with the "literal" softmax and the "global" rescaling, and the
    default energy importance (no controller).
    """
    data, community = tiered_communities()
    user_emb, item_emb = svd_embeddings(data)
    item_groups = make_item_groups(data.item_popularity, GroupConfig(n_item_groups=5), 0)
    # community 0 split in two halves (groups 0 and 2), community 1 is group 1
    user_groups = community.copy()
    user_groups[np.flatnonzero(community == 0)[1::2]] = 2
    cfg = FinetuneConfig(n_blocks=4, block_dim=4, scorer="dot", alpha_scale=scale,
                         controller_hidden=16, batch_size=128, max_epochs=8, patience=8,
                         controller_lr=1e-2, early_stop_budgets=(1.0,), **stage2)
    finetune_groups(data, user_emb, item_emb, user_groups, item_groups, cfg, tmp_path,
                    SerialExecutor(progress=False), seed=1)
    arrays = [load_group(tmp_path / "groups" / f"group_{g:03d}.npz") for g in range(3)]
    alpha = [a["alpha"] / a["alpha"].sum() for a in arrays]

    def dist(i: int, j: int) -> float:
        return float(np.abs(alpha[i] - alpha[j]).sum())

    same, different = dist(0, 2), min(dist(0, 1), dist(2, 1))
    assert different > 0.5
    assert different > 2 * same


def test_block_diversity_is_kept_after_fine_tuning(demo_run: dict) -> None:
    """Mean pairwise distance between blocks (normalised Eq. 2 term) does not collapse."""
    start = torch.from_numpy(demo_run["item_emb"])
    before = normalise_blocks(start, start.mean(0), start.var(0), 4, 1e-5)
    div_before = mean_block_distance(before.reshape(len(start), -1).numpy(), 4)
    assert div_before > 1.0
    for g in (0, 1):
        blocks = load_group(Path(demo_run["out"]) / "groups" / f"group_{g:03d}.npz")["blocks"]
        assert mean_block_distance(blocks.reshape(len(blocks), -1), 4) > 0.9 * div_before


def test_group_without_validation_interactions_still_trains(tmp_path: Path) -> None:
    data = make_demo(SyntheticConfig(n_users=120, n_items=80, seed=2))
    user_groups = (np.arange(data.n_users) >= 100).astype(np.int64)
    valid = data.valid.tolil()
    valid[100:] = 0  # group 1 has no validation data: no controller steps, no early stopping
    blind = from_splits(data.train, sp.csr_matrix(valid), data.test)
    user_emb, item_emb = svd_embeddings(blind)
    item_groups = make_item_groups(blind.item_popularity, GroupConfig(n_item_groups=4), 0)
    cfg = FinetuneConfig(n_blocks=4, block_dim=4, mlp_hidden=8, controller_hidden=8,
                         batch_size=256, max_epochs=2, **PAPER)
    summaries = finetune_groups(blind, user_emb, item_emb, user_groups, item_groups, cfg,
                                tmp_path, SerialExecutor(progress=False), seed=0)
    assert summaries[1].n_valid == 0 and summaries[1].valid == {}
    assert summaries[1].epochs == 2
    alpha = load_group(tmp_path / "groups" / "group_001.npz")["alpha"]
    np.testing.assert_allclose(alpha, 1 / alpha.size, rtol=1e-6)  # never updated: uniform
    with pytest.raises(ValueError, match="early_stop_budgets"):
        FinetuneConfig(early_stop_budgets=(0.0,)).validate()


# --------------------------------------------------------------------------- SVD start, energy


def _svd_run(tmp_path: Path, **overrides: object) -> tuple[dict, InteractionData, np.ndarray,
                                                           np.ndarray, np.ndarray]:
    data = make_demo(SyntheticConfig(n_users=300, n_items=200, seed=0))
    user_emb, item_emb = svd_embeddings(data)
    item_groups = make_item_groups(data.item_popularity, GroupConfig(n_item_groups=5), 0)
    user_groups = np.arange(data.n_users) % 2
    cfg = FinetuneConfig(n_blocks=4, block_dim=4, init="svd_group", transform="identity",
                         importance="energy", batch_size=128, max_epochs=0, patience=2)
    cfg = FinetuneConfig(**{**cfg.__dict__, **overrides})
    finetune_groups(data, user_emb, item_emb, user_groups, item_groups, cfg, tmp_path,
                    SerialExecutor(progress=False), seed=1)
    return (load_group(tmp_path / "groups" / "group_000.npz"), data, user_emb, item_emb,
            user_groups)


def test_svd_start_without_transform_keeps_every_pretrained_score(tmp_path: Path) -> None:
    """Full budget = the pretrained model: the group's rotation changes no score."""
    g, _, user_emb, item_emb, user_groups = _svd_run(tmp_path)
    users = np.flatnonzero(user_groups == 0)
    got = g["user_emb"] @ g["blocks"].reshape(len(g["blocks"]), -1).T
    np.testing.assert_allclose(got, user_emb[users] @ item_emb.T, atol=1e-3)
    # the group's own singular basis: its first block carries the most score energy
    energy = g["alpha"].sum(0)
    assert energy[0] == energy.max()


def test_energy_importance_is_the_squared_score_mass(tmp_path: Path) -> None:
    g, *_ = _svd_run(tmp_path)
    alpha, blocks, users, groups = g["alpha"], g["blocks"], g["user_emb"], g["item_group"]
    n, d = blocks.shape[1], blocks.shape[2]
    brute = np.zeros(alpha.shape)
    for j in range(len(blocks)):
        for b in range(n):
            part = users[:, b * d:(b + 1) * d] @ blocks[j, b].astype(np.float64)
            brute[groups[j], b] += float(part @ part)
    np.testing.assert_allclose(alpha, brute / brute.mean(), rtol=1e-4)
    assert alpha.mean() == pytest.approx(1.0, rel=1e-5)


def test_sandwich_loss_with_every_block_kept_is_the_plain_bpr_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    cfg = FinetuneConfig(n_blocks=4, block_dim=4, transform="identity", importance="energy",
                         train_budgets=(1.0,))
    items = np.random.default_rng(0).normal(size=(30, 16)).astype(np.float32)
    users = np.random.default_rng(1).normal(size=(10, 16)).astype(np.float32)
    groups = np.arange(30) % 3
    model = GroupModel(items, users, groups, np.full(3, 1 / 3), cfg, gen)
    lb = localise(Triples(np.arange(10), np.arange(10), np.arange(10, 20)))
    w = model.gather(lb, requires_grad=False)
    plain, _, _ = model.train_loss(lb, w)
    model.refresh_budget_masks()
    assert model.budget_masks is not None and bool(model.budget_masks.all())
    sandwich, _, _ = model.train_loss(lb, w)
    assert float(sandwich) == pytest.approx(float(plain), rel=1e-6)


def test_distillation_is_zero_when_kept_blocks_order_pairs_like_the_full_table() -> None:
    """With every block kept the kept set IS the full table: the distillation term is the
    cross-entropy of a distribution with itself (its entropy), and its gradient reaches the
    kept blocks only, so a kept set that disagrees with the full table pays more."""
    gen = torch.Generator().manual_seed(0)
    items = np.random.default_rng(0).normal(size=(30, 16)).astype(np.float32)
    users = np.random.default_rng(1).normal(size=(10, 16)).astype(np.float32)
    groups = np.arange(30) % 3
    lb = localise(Triples(np.arange(10), np.arange(10), np.arange(10, 20)))

    def loss(distill: float, budgets: tuple[float, ...]) -> float:
        cfg = FinetuneConfig(n_blocks=4, block_dim=4, transform="identity",
                             importance="energy", train_budgets=budgets, distill=distill)
        model = GroupModel(items, users, groups, np.full(3, 1 / 3), cfg, gen)
        model.refresh_budget_masks()
        value, _, _ = model.train_loss(lb, model.gather(lb, requires_grad=False))
        return float(value)

    margin = torch.tensor((users[:10] * items[:10]).sum(1) - (users[:10] * items[10:20]).sum(1))
    p = torch.sigmoid(margin)
    entropy = float(-(p * p.log() + (1 - p) * (1 - p).log()).mean())
    assert loss(2.0, (1.0,)) - loss(0.0, (1.0,)) == pytest.approx(2.0 * entropy, rel=1e-4)
    # a kept set of a quarter of the blocks disagrees with the full table: it pays more
    excess = loss(2.0, (0.25,)) - loss(0.0, (0.25,))
    assert excess > 2.0 * entropy + 1e-3


def test_distillation_needs_training_budgets() -> None:
    with pytest.raises(ValueError, match="distill"):
        FinetuneConfig(train_budgets=(), distill=1.0).validate()
    with pytest.raises(ValueError, match="distill"):
        FinetuneConfig(distill=-1.0).validate()


def test_fine_tuning_never_ends_below_its_starting_point(tmp_path: Path) -> None:
    """Epoch 0 competes in early stopping: a harmful learning rate leaves the start as it was."""
    start, *_ = _svd_run(tmp_path / "a")
    tuned, *_ = _svd_run(tmp_path / "b", max_epochs=2, lr=50.0, patience=1)
    meta = json.loads((tmp_path / "b" / "groups" / "group_000.json").read_text())
    assert meta["best_epoch"] == 0
    np.testing.assert_array_equal(tuned["blocks"], start["blocks"])


def test_train_budgets_need_the_aligned_dot_scorer() -> None:
    with pytest.raises(ValueError, match="train_budgets"):
        FinetuneConfig(train_budgets=(0.2,), scorer="mlp").validate()
    with pytest.raises(ValueError, match="init"):
        FinetuneConfig(init="pca").validate()
