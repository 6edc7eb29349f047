"""SC09 automatic metrics (FID, IS, mIS, AM, NDB) and the paper's sample-selection protocol.

Numpy arrays in, Python floats out, natural logarithms. Conventions follow the official SaShiMi
evaluation code (state-spaces/s4 `models/sashimi/metrics.py`), re-derived from its documented
behaviour (SPEC, fixtures/README.md section 5). The paper's IS (`inception_score`, paper=True)
takes the KL per class column against the uniform distribution over half the samples: the
textbook IS when that half's class marginal is uniform, larger otherwise. `sc09_scores` gives
the numbers of an SC09 table row; `select_paper_subset` picks the AR samples scored.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
from scipy.special import entr, rel_entr
from scipy.stats import norm as _normal

from sashimi.errors import UserError

__all__ = [
    "fid",
    "fid_from_stats",
    "inception_score",
    "modified_inception_score",
    "modified_inception_score_exact",
    "am_score",
    "ndb_score",
    "kmeans",
    "select_paper_subset",
    "sc09_scores",
    "kl_divergence",
    "entropy",
]

FID_EPS = 1e-4  # diagonal offset added to both covariances when sqrtm is not finite


# ----------------------------------------------------------------------------- helpers
def _as_2d(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise UserError(f"{name}: expected a 2-D array (samples, dims), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise UserError(f"{name}: contains NaN or inf")
    return x


def _normalise(p: np.ndarray, axis: int) -> np.ndarray:
    """Scale to sum 1 along `axis` (what scipy.stats.entropy does to its inputs)."""
    return p / np.sum(p, axis=axis, keepdims=True)


def kl_divergence(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
    """KL(p || q) along `axis` after normalising both (scipy.stats.entropy(p, q) semantics)."""
    p = _normalise(np.asarray(p, dtype=np.float64), axis)
    q = _normalise(np.asarray(q, dtype=np.float64), axis)
    return np.sum(rel_entr(p, q), axis=axis)


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (nats) along `axis` after normalising (scipy.stats.entropy(p) semantics)."""
    p = _normalise(np.asarray(p, dtype=np.float64), axis)
    return np.sum(entr(p), axis=axis)


# ----------------------------------------------------------------------------- FID
def fid(feat_gen: np.ndarray, feat_ref: np.ndarray) -> float:
    """Frechet distance |mu_g - mu_r|^2 + Tr(S_g + S_r - 2 Re sqrtm(S_r S_g)) of (n, d) features,
    covariances with ddof 1; a non-finite sqrtm is retried with 1e-4 I added to both."""
    feat_gen = _as_2d(feat_gen, "feat_gen")
    feat_ref = _as_2d(feat_ref, "feat_ref")
    if feat_gen.shape[1] != feat_ref.shape[1]:
        raise UserError(
            f"fid: feature dims differ (generated {feat_gen.shape[1]}, reference {feat_ref.shape[1]})"
        )
    if min(len(feat_gen), len(feat_ref)) < 2:
        raise UserError("fid: need at least 2 samples on each side for a covariance")
    mu_g, mu_r = feat_gen.mean(axis=0), feat_ref.mean(axis=0)  # (d,)
    S_g = np.atleast_2d(np.cov(feat_gen, rowvar=False))  # (d, d), ddof 1
    S_r = np.atleast_2d(np.cov(feat_ref, rowvar=False))  # (d, d)
    return fid_from_stats(mu_g, S_g, mu_r, S_r)


def fid_from_stats(mu_g: np.ndarray, S_g: np.ndarray, mu_r: np.ndarray, S_r: np.ndarray) -> float:
    """FID from means (d,) and covariances (d, d), so reference statistics can be cached; silent
    on singular matrices, as the official `sqrtm(..., disp=False)`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(S_r @ S_g)  # (d, d), possibly complex
        if not np.all(np.isfinite(covmean)):
            offset = FID_EPS * np.eye(S_g.shape[0])
            covmean = scipy.linalg.sqrtm((S_r + offset) @ (S_g + offset))
    covmean = np.real(covmean)
    diff = mu_g - mu_r  # (d,)
    return float(diff @ diff + np.trace(S_g) + np.trace(S_r) - 2.0 * np.trace(covmean))


# ----------------------------------------------------------------------------- IS
def inception_score(probs: np.ndarray, paper: bool = True, seed: int = 0) -> float:
    """Inception score of class probabilities `probs` (n, C).

    paper=True: the first n//2 rows of RandomState(seed).permutation(n) (the official seed(0)
    shuffle) give IS_paper = exp(mean_c KL(p[:, c] / sum p[:, c] || U(n//2))); the official code's
    tiled constant column normalises to that uniform. paper=False: the textbook
    exp(mean_x KL(p(y|x) || p(y))) over all rows."""
    probs = _as_2d(probs, "probs")
    n = probs.shape[0]
    if not paper:
        p_y = probs.mean(axis=0, keepdims=True)  # (1, C)
        return float(np.exp(np.mean(kl_divergence(probs, p_y, axis=1))))
    if n < 2:
        raise UserError("inception_score: need at least 2 samples")
    perm = np.random.RandomState(seed).permutation(n)  # (n,) == legacy global seed(0) sequence
    half1 = probs[perm[: n // 2]]  # (n//2, C)
    half2 = probs[perm[n // 2 :]]  # (n - n//2, C)
    q = np.tile(half2.mean(axis=0), (half1.shape[0], 1))  # (n//2, C): constant per column
    kl_per_class = kl_divergence(half1, q, axis=0)  # (C,): per column, over samples
    return float(np.exp(np.mean(kl_per_class)))


# ----------------------------------------------------------------------------- mIS
def modified_inception_score(probs: np.ndarray, n: int = 10000, seed: int = 0) -> float:
    """Modified IS: exp(mean over n random pairs (i, j), with replacement, of KL(p_i || p_j)).

    One legacy `randint(0, n_rows, size=(n, 2))` draws the same pairs as the official loop of
    `np.random.choice(n_rows, size=2)` after seed(0) (tests compare the two).
    """
    probs = _as_2d(probs, "probs")
    pairs = np.random.RandomState(seed).randint(0, probs.shape[0], size=(n, 2))  # (n, 2)
    kl = kl_divergence(probs[pairs[:, 0]], probs[pairs[:, 1]], axis=1)  # (n,)
    return float(np.exp(np.mean(kl)))


def modified_inception_score_exact(probs: np.ndarray) -> float:
    """The quantity mIS estimates: exp of the mean KL(p_i || p_j) over all ordered pairs (i, j),
    i = j included (as sampling with replacement), the (n, n) KLs as one matrix product."""
    probs = _normalise(_as_2d(probs, "probs"), axis=1)
    with np.errstate(divide="ignore"):
        log_p = np.log(probs)  # (n, C), -inf where p = 0
    neg_h = np.sum(np.where(probs > 0, probs * np.where(probs > 0, log_p, 0.0), 0.0), axis=1)
    if np.any(probs == 0):  # exact handling of zeros: p_ic > 0 with p_jc = 0 makes KL inf
        cross = np.einsum("ic,jc->ij", probs, np.where(np.isfinite(log_p), log_p, 0.0))
        inf = (probs > 0).astype(np.float64) @ (probs == 0).astype(np.float64).T > 0  # (n, n)
        kl = np.where(inf, np.inf, neg_h[:, None] - cross)
    else:
        kl = neg_h[:, None] - probs @ log_p.T  # (n, n): KL(p_i || p_j)
    return float(np.exp(np.mean(kl)))


# ----------------------------------------------------------------------------- AM
def am_score(probs_ref: np.ndarray, probs_gen: np.ndarray) -> float:
    """AM score: KL(mean_ref || mean_gen) + mean_x H(p_gen(y|x)), natural log."""
    probs_ref = _as_2d(probs_ref, "probs_ref")
    probs_gen = _as_2d(probs_gen, "probs_gen")
    kl = kl_divergence(probs_ref.mean(axis=0), probs_gen.mean(axis=0))
    return float(kl + np.mean(entropy(probs_gen, axis=1)))


# ----------------------------------------------------------------------------- NDB
def kmeans(
    x: np.ndarray, k: int, seed: int = 0, n_iter: int = 100, n_init: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded Lloyd k-means, k-means++ init, best of `n_init`: (centroids (k, d), labels (n,))."""
    x = _as_2d(x, "kmeans input")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise UserError(f"kmeans: k={k} must be between 1 and the number of samples ({n})")
    rng = np.random.RandomState(seed)
    best = (np.inf, None, None)
    for _ in range(n_init):
        centroids = x[[rng.randint(n)]]  # (1, d)
        for _ in range(1, k):  # k-means++: sample proportionally to squared distance
            d2 = _sq_dist(x, centroids).min(axis=1)  # (n,)
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
            centroids = np.vstack([centroids, x[rng.choice(n, p=p)]])
        labels = None
        for _ in range(n_iter):
            new_labels = _sq_dist(x, centroids).argmin(axis=1)  # (n,)
            if labels is not None and np.array_equal(new_labels, labels):
                break
            labels = new_labels
            for j in range(k):
                members = x[labels == j]
                if len(members):  # an empty cluster keeps its centroid
                    centroids[j] = members.mean(axis=0)
        inertia = _sq_dist(x, centroids).min(axis=1).sum()
        if inertia < best[0]:
            best = (inertia, centroids.copy(), labels.copy())
    return best[1], best[2]


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (n, k)."""
    return np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :], 0.0)


def ndb_score(
    feat_ref: np.ndarray, feat_gen: np.ndarray, k: int = 50, seed: int = 0, alpha: float = 0.05
) -> float:
    """NDB/k: fraction of k-means bins (fit on the reference) whose occupancy differs by a
    two-sided pooled two-proportion z-test at `alpha`. Own seeded k-means, not the official
    scikit-learn KMeans (version-dependent): same definition, different values."""
    feat_ref = _as_2d(feat_ref, "feat_ref")
    feat_gen = _as_2d(feat_gen, "feat_gen")
    centroids, labels_ref = kmeans(feat_ref, k, seed=seed)
    labels_gen = _sq_dist(feat_gen, centroids).argmin(axis=1)
    n_r, n_g = len(feat_ref), len(feat_gen)
    p_r = np.bincount(labels_ref, minlength=k) / n_r  # (k,)
    p_g = np.bincount(labels_gen, minlength=k) / n_g  # (k,)
    pooled = (p_r * n_r + p_g * n_g) / (n_r + n_g)
    se = np.sqrt(pooled * (1 - pooled) * (1.0 / n_r + 1.0 / n_g))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, (p_g - p_r) / se, 0.0)
    different = np.abs(z) > _normal.ppf(1 - alpha / 2)
    return float(different.sum() / k)


# ----------------------------------------------------------------------------- protocol
def select_paper_subset(
    loglik: np.ndarray, seed: int = 0, drop_low_pct: int = 40, drop_high_pct: int = 5
) -> np.ndarray:
    """Indices of the autoregressive samples the paper scores (ascending index order).

    The first m = n // 2 of RandomState(seed).permutation(n), sorted by log-likelihood (stable),
    less the bottom floor(drop_low_pct m / 100) and top floor(drop_high_pct m / 100):
    10,240 clips -> m = 5,120 -> drop 2,048 and 256 -> 2,816 scored.
    """
    loglik = np.asarray(loglik, dtype=np.float64).reshape(-1)
    n = loglik.size
    if n < 2:
        raise UserError(f"select_paper_subset: need at least 2 samples, got {n}")
    if np.any(np.isnan(loglik)):
        raise UserError("select_paper_subset: log-likelihoods contain NaN")
    m = n // 2
    held = np.random.RandomState(seed).permutation(n)[:m]  # (m,)
    order = held[np.argsort(loglik[held], kind="stable")]  # (m,) ascending likelihood
    n_low = (drop_low_pct * m) // 100
    n_high = (drop_high_pct * m) // 100
    keep = order[n_low : m - n_high]
    return np.sort(keep)


# ----------------------------------------------------------------------------- a table row
def sc09_scores(
    feat_gen: np.ndarray,
    probs_gen: np.ndarray,
    mu_ref: np.ndarray,
    cov_ref: np.ndarray,
    probs_ref: np.ndarray,
) -> dict[str, float]:
    """FID, IS (paper), IS (textbook), mIS and AM of generated clips: features (n, d) and
    probabilities (n, C) against the reference split's feature mean (d,), covariance (d, d)
    and probabilities (m, C)."""
    feat_gen = _as_2d(feat_gen, "feat_gen")
    if len(feat_gen) < 2:
        raise UserError(f"need at least 2 clips to score, got {len(feat_gen)}")
    S_g = np.atleast_2d(np.cov(feat_gen, rowvar=False))  # (d, d), ddof 1
    return {
        "fid": fid_from_stats(feat_gen.mean(axis=0), S_g, mu_ref, cov_ref),
        "is": inception_score(probs_gen, paper=True),
        "is_textbook": inception_score(probs_gen, paper=False),
        "mis": modified_inception_score(probs_gen),
        "am": am_score(probs_ref, probs_gen),
    }
