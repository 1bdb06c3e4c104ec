"""User groups and item groups: the two partitions PEEL's search space is built on.

Section IV-A/IV-C1 of the paper: users are clustered by K-Means on their pretrained embeddings
(Eq. 3) so that each group gets its own fine-tuned item table and block weights; items are cut
into equal-size groups by training popularity so that the controller only has to weigh
G_v x N blocks instead of |V| x N. The two ablations of Section V-E are options here: random
item groups ("w/o PopSeg") and a single user group ("w/o User Clustering").

Group ids are deterministic functions of (inputs, config, seed), and user-group ids are
relabelled in order of each group's smallest user index, so the same clustering always yields
the same file names downstream regardless of K-Means' internal label order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

USER_GROUPINGS = ("kmeans", "single")
ITEM_GROUPINGS = ("popularity", "random")


@dataclass(frozen=True)
class GroupConfig:
    """How users and items are partitioned. Defaults: the paper's G_u=15, G_v=20 (Sec. V-A4)."""

    n_user_groups: int = 15  # G_u
    n_item_groups: int = 20  # G_v
    user_grouping: str = "kmeans"  # "kmeans" | "single" (ablation "w/o User Clustering")
    item_grouping: str = "popularity"  # "popularity" | "random" (ablation "w/o PopSeg")
    kmeans_n_init: int = 10  # fixed restarts so results do not depend on sklearn's default
    # Cluster directions (L2-normalised embeddings) instead of raw vectors. Off by default (Eq. 3
    # as written); on raw embeddings the norm, i.e. user activity, can dominate the clustering
    # and produce one giant group (seen with SVD embeddings of gowalla, docs/paper-notes.md).
    normalize: bool = False
    kmeans_max_iter: int = 300

    def validate(self) -> None:
        if self.user_grouping not in USER_GROUPINGS:
            raise ValueError(f"user_grouping must be one of {USER_GROUPINGS}, "
                             f"got {self.user_grouping!r}")
        if self.item_grouping not in ITEM_GROUPINGS:
            raise ValueError(f"item_grouping must be one of {ITEM_GROUPINGS}, "
                             f"got {self.item_grouping!r}")
        if self.n_user_groups < 1 or self.n_item_groups < 1:
            raise ValueError("n_user_groups and n_item_groups must be >= 1")
        if self.kmeans_n_init < 1 or self.kmeans_max_iter < 1:
            raise ValueError("kmeans_n_init and kmeans_max_iter must be >= 1")


def make_user_groups(user_emb: np.ndarray, cfg: GroupConfig, seed: int) -> np.ndarray:
    """Group id (int64, 0..G_u-1) of every user: K-Means on pretrained embeddings (Eq. 3).

    Raises if there are fewer users than groups, since K-Means would then leave groups empty
    and every later stage assumes each group has users.
    """
    cfg.validate()
    emb = np.asarray(user_emb)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"user_emb must be a non-empty (n_users, D) array, got {emb.shape}")
    if not np.isfinite(emb).all():
        raise ValueError("user_emb contains NaN or inf; check the pretraining run")
    n_users = emb.shape[0]
    if cfg.user_grouping == "single" or cfg.n_user_groups == 1:
        return np.zeros(n_users, dtype=np.int64)
    if n_users < cfg.n_user_groups:
        raise ValueError(f"cannot make {cfg.n_user_groups} user groups from {n_users} users;"
                         " lower n_user_groups")
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=cfg.n_user_groups, n_init=cfg.kmeans_n_init,
                max_iter=cfg.kmeans_max_iter, random_state=seed)
    # float64 makes the clustering independent of the caller's dtype (and of BLAS rounding).
    x = emb.astype(np.float64)
    if cfg.normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = km.fit_predict(x)
    return relabel_by_first_member(labels, cfg.n_user_groups)


def relabel_by_first_member(labels: np.ndarray, n_groups: int) -> np.ndarray:
    """Renumber groups in order of their smallest member; empty groups are an error."""
    labels = np.asarray(labels, dtype=np.int64)
    _, first = np.unique(labels, return_index=True)
    if len(first) != n_groups:
        raise ValueError(f"clustering produced {len(first)} non-empty groups, expected"
                         f" {n_groups}; lower n_user_groups")
    old_in_order = labels[np.sort(first)]
    mapping = np.empty(n_groups, dtype=np.int64)
    mapping[old_in_order] = np.arange(n_groups)
    return mapping[labels]


def make_item_groups(item_popularity: np.ndarray, cfg: GroupConfig, seed: int) -> np.ndarray:
    """Group id (int64, 0..G_v-1) of every item; group 0 holds the most popular items.

    Sizes differ by at most one (ranks are cut at rank * G_v // |V|). Ties in popularity are
    broken by item index so the partition is a pure function of the popularity vector.
    """
    cfg.validate()
    pop = np.asarray(item_popularity)
    if pop.ndim != 1 or len(pop) == 0:
        raise ValueError(f"item_popularity must be a non-empty 1-D array, got {pop.shape}")
    n_items = len(pop)
    if n_items < cfg.n_item_groups:
        raise ValueError(f"cannot make {cfg.n_item_groups} item groups from {n_items} items;"
                         " lower n_item_groups")
    if cfg.item_grouping == "popularity":
        order = np.lexsort((np.arange(n_items), -pop.astype(np.float64)))
    else:
        order = np.random.default_rng([seed, 7919]).permutation(n_items)
    groups = np.empty(n_items, dtype=np.int64)
    groups[order] = np.arange(n_items, dtype=np.int64) * cfg.n_item_groups // n_items
    return groups


def group_sizes(groups: np.ndarray, n_groups: int | None = None) -> np.ndarray:
    """Members per group (int64), for logs and reports."""
    groups = np.asarray(groups, dtype=np.int64)
    n = int(groups.max()) + 1 if n_groups is None else n_groups
    return np.bincount(groups, minlength=n)


def describe_groups(user_groups: np.ndarray, item_groups: np.ndarray,
                    item_popularity: np.ndarray) -> dict[str, list[int]]:
    """Sizes and interaction mass per group, JSON-ready, for the run log."""
    item_groups = np.asarray(item_groups, dtype=np.int64)
    mass = np.bincount(item_groups, weights=np.asarray(item_popularity, dtype=np.float64))
    return {
        "user_group_sizes": group_sizes(user_groups).tolist(),
        "item_group_sizes": group_sizes(item_groups).tolist(),
        "item_group_interactions": [int(m) for m in mass],
    }
