"""Built-in demo data: implicit feedback with planted user communities and long-tail items.

The generator is built so that PEEL's point can show: users come in communities, each community
prefers its own mix of item topics (with overlap between communities), and within a topic item
popularity is long-tailed. A single global model must compromise between communities; per-group
item tables and per-group block weights can specialise. Everything is seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from peel.data import DataConfig, InteractionData, _Raw, assemble


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and shape of the planted-community data set."""

    n_users: int = 2000
    n_items: int = 1500
    n_communities: int = 6
    n_topics: int = 12
    topics_per_community: int = 3  # topics a community concentrates on (shared with others)
    community_focus: float = 0.85  # share of a user's interactions drawn from the favourites
    mean_interactions: float = 40.0  # per user, log-normally spread
    min_interactions: int = 12
    popularity_exponent: float = 1.0  # Zipf exponent of item popularity within a topic
    community_popularity_shift: float = 0.5  # how much communities disagree on what is popular
    seed: int = 0


def _topic_preferences(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """(communities, topics) probabilities; favourite sets overlap through shared topics."""
    prefs = np.full((cfg.n_communities, cfg.n_topics), (1 - cfg.community_focus) / cfg.n_topics)
    for c in range(cfg.n_communities):
        # A sliding window over topics makes neighbouring communities share favourites.
        start = (c * cfg.n_topics) // cfg.n_communities
        fav = (start + np.arange(cfg.topics_per_community)) % cfg.n_topics
        weights = rng.dirichlet(np.full(cfg.topics_per_community, 2.0))
        prefs[c, fav] += cfg.community_focus * weights
    return prefs / prefs.sum(axis=1, keepdims=True)


def _item_weights(cfg: SyntheticConfig, topic_of: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """(communities, items) within-topic sampling weights: a shared Zipf tail plus a
    community-specific re-ranking, so the items a community likes differ beyond topics."""
    base = np.empty(cfg.n_items)
    for t in range(cfg.n_topics):
        members = np.flatnonzero(topic_of == t)
        ranks = rng.permutation(len(members)) + 1
        base[members] = ranks.astype(np.float64) ** -cfg.popularity_exponent
    noise = rng.lognormal(0.0, cfg.community_popularity_shift * 2,
                          size=(cfg.n_communities, cfg.n_items))
    return base[None, :] * noise


def generate(cfg: SyntheticConfig | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (user, item, community_of_user) arrays of unique interactions."""
    cfg = cfg or SyntheticConfig()
    if cfg.n_items < cfg.n_topics or cfg.n_communities < 1 or cfg.n_users < 1:
        raise ValueError(f"degenerate synthetic config: {cfg}")
    rng = np.random.default_rng(cfg.seed)
    topic_of = rng.integers(0, cfg.n_topics, size=cfg.n_items)
    topic_of[: cfg.n_topics] = np.arange(cfg.n_topics)  # every topic has an item
    prefs = _topic_preferences(cfg, rng)
    weights = _item_weights(cfg, topic_of, rng)
    community = rng.integers(0, cfg.n_communities, size=cfg.n_users)
    sigma = 0.6
    counts = rng.lognormal(np.log(cfg.mean_interactions) - sigma**2 / 2, sigma, size=cfg.n_users)
    counts = np.clip(np.rint(counts), cfg.min_interactions, cfg.n_items // 2).astype(np.int64)
    # Per-community item distribution = P(topic | community) * P(item | topic, community).
    topic_mass = np.zeros((cfg.n_communities, cfg.n_topics))
    for t in range(cfg.n_topics):
        topic_mass[:, t] = weights[:, topic_of == t].sum(axis=1)
    item_prob = prefs[:, topic_of] * weights / topic_mass[:, topic_of]
    item_prob /= item_prob.sum(axis=1, keepdims=True)
    users, items = [], []
    for c in range(cfg.n_communities):
        members = np.flatnonzero(community == c)
        if len(members) == 0:
            continue
        # Gumbel top-k draws each user's distinct items without replacement in one shot.
        logp = np.log(item_prob[c])
        keys = logp[None, :] + rng.gumbel(size=(len(members), cfg.n_items))
        order = np.argsort(-keys, axis=1)
        take = counts[members]
        mask = np.arange(cfg.n_items)[None, :] < take[:, None]
        users.append(np.repeat(members, take))
        items.append(order[mask])
    u = np.concatenate(users)
    i = np.concatenate(items)
    order = np.lexsort((i, u))
    return u[order], i[order], community


def make_demo(cfg: SyntheticConfig | None = None,
              data_cfg: DataConfig | None = None) -> InteractionData:
    """The demo dataset, split per user 7:1:2 like the paper."""
    return make_demo_with_communities(cfg, data_cfg)[0]


def make_demo_with_communities(
    cfg: SyntheticConfig | None = None, data_cfg: DataConfig | None = None
) -> tuple[InteractionData, np.ndarray]:
    """The demo dataset plus each (contiguous) user's planted community, for tests."""
    cfg = cfg or SyntheticConfig()
    u, i, community = generate(cfg)
    raw = _Raw(u.astype(np.int64), i.astype(np.int64))
    data_cfg = data_cfg or DataConfig(seed=cfg.seed)
    data = assemble({"all": raw}, data_cfg, name=f"synthetic-{cfg.seed}")
    return data, community[data.user_ids.astype(np.int64)]


def write_lightgcn_folder(data: InteractionData, out_dir: str) -> None:
    """Write a dataset as train/valid/test.txt (``user item item ...``) for other tools."""
    from pathlib import Path

    from peel.io import write_text

    out = Path(out_dir)
    for split in ("train", "valid", "test"):
        m = data.split_matrix(split)
        lines = []
        for u in range(m.shape[0]):
            row = m.indices[m.indptr[u] : m.indptr[u + 1]]
            if len(row):
                lines.append(" ".join(map(str, [u, *row.tolist()])))
        write_text(out / f"{split}.txt", "\n".join(lines) + "\n")
