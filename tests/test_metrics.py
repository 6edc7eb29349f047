"""SC09 metrics against independent computations and the official fixture (sc09_metrics.npz)."""

from __future__ import annotations

import numpy as np
import pytest

from sashimi import metrics as M

CASES = {"A": "genA", "B": "genB", "train": "train"}


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    with np.load(fixtures_dir / "sc09_metrics.npz") as z:
        return {k: z[k] for k in z.files}


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _probs(n, C=10, bonus=4.0, labels=None, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n) if labels is None else labels
    z = rng.normal(size=(n, C))
    z[np.arange(n), labels] += bonus
    return _softmax(z)


# ----------------------------------------------------------------------------- official fixture
@pytest.mark.parametrize("case", list(CASES))
def test_fixture_values(fx, case):
    feat, probs = fx[f"{CASES[case]}_feat"], fx[f"{CASES[case]}_probs"]
    # the official call order is fid(train, gen); ours is fid(gen, ref)
    assert M.fid(feat, fx["train_feat"]) == pytest.approx(float(fx[f"{case}_fid"]), abs=1e-6)
    assert M.inception_score(probs) == pytest.approx(float(fx[f"{case}_is"]), abs=1e-6)
    assert M.modified_inception_score(probs) == pytest.approx(float(fx[f"{case}_mis"]), abs=1e-6)
    assert M.am_score(fx["train_probs"], probs) == pytest.approx(float(fx[f"{case}_am"]), abs=1e-6)
    assert int(fx["mis_n_pairs_default"]) == 10000


@pytest.mark.parametrize("case", ["A", "B"])
def test_sc09_scores_reproduce_the_official_row(fx, case):
    """One table row from cached reference statistics equals the official metrics."""
    ref = fx["train_feat"]
    row = M.sc09_scores(
        fx[f"gen{case}_feat"],
        fx[f"gen{case}_probs"],
        ref.mean(0),
        np.cov(ref, rowvar=False),
        fx["train_probs"],
    )
    for key in ("fid", "is", "mis", "am"):
        assert row[key] == pytest.approx(float(fx[f"{case}_{key}"]), abs=1e-6), key
    assert row["is_textbook"] == pytest.approx(
        M.inception_score(fx[f"gen{case}_probs"], paper=False)
    )
    with pytest.raises(M.UserError, match="at least 2 clips"):
        M.sc09_scores(ref[:1], fx["train_probs"][:1], ref.mean(0), np.eye(32), fx["train_probs"])


@pytest.mark.parametrize("case", ["A", "train"])
def test_fixture_distinguishes_is_conventions(fx, case):
    """The official IS takes the KL per class column; the row-wise KL diagnostic differs."""
    probs = fx[f"{CASES[case]}_probs"]
    n = len(probs)
    perm = np.random.RandomState(0).permutation(n)
    h1, h2 = probs[perm[: n // 2]], probs[perm[n // 2 :]]
    rowwise = np.exp(np.mean(M.kl_divergence(h1, np.tile(h2.mean(0), (len(h1), 1)), axis=1)))
    assert rowwise == pytest.approx(float(fx[f"{case}_diag_is_rowwise_kl"]), abs=1e-9)
    assert abs(M.inception_score(probs) - rowwise) > 1e-2  # ours follows the per-column one


def test_ndb_sanity_against_fixture_cases(fx):
    """NDB uses our own seeded k-means, so it does not reproduce the scikit-learn-based
    fixture values (A 0.08, B 0.54, train 0.0); only the ordering and the self-score are checked."""
    ref = fx["train_feat"]
    self_score = M.ndb_score(ref, ref)
    a, b = M.ndb_score(ref, fx["genA_feat"]), M.ndb_score(ref, fx["genB_feat"])
    assert self_score == 0.0 == float(fx["train_ndb"])
    assert 0.0 <= a < b <= 1.0


# ----------------------------------------------------------------------------- FID
def _fid_eig(xg, xr):
    """Direct oracle: Tr sqrtm(S_r S_g) = sum sqrt(eig(S_r^1/2 S_g S_r^1/2)) (symmetric PSD)."""
    mu_g, mu_r = xg.mean(0), xr.mean(0)
    Sg, Sr = np.cov(xg, rowvar=False), np.cov(xr, rowvar=False)
    w, V = np.linalg.eigh(Sr)
    Sr_half = (V * np.sqrt(np.clip(w, 0, None))) @ V.T
    lam = np.linalg.eigvalsh(Sr_half @ Sg @ Sr_half)
    return float(
        np.sum((mu_g - mu_r) ** 2)
        + np.trace(Sg)
        + np.trace(Sr)
        - 2 * np.sum(np.sqrt(np.clip(lam, 0, None)))
    )


def test_fid_matches_eigen_formula():
    rng = np.random.default_rng(1)
    A = rng.normal(size=(8, 8))
    xr = rng.normal(size=(500, 8)) @ A
    xg = 0.7 * rng.normal(size=(400, 8)) @ A.T + 0.5
    assert M.fid(xg, xr) == pytest.approx(_fid_eig(xg, xr), rel=1e-9, abs=1e-9)
    assert M.fid(xr, xr) == pytest.approx(0.0, abs=1e-8)
    # same covariance, shifted mean: FID = |shift|^2
    shift = rng.normal(size=8)
    assert M.fid(xr + shift, xr) == pytest.approx(float(shift @ shift), rel=1e-8)


def test_fid_retries_with_offset(monkeypatch):
    """A non-finite sqrtm triggers the retry with 1e-4 I added to both covariances."""
    import scipy.linalg

    rng = np.random.default_rng(2)
    xr, xg = rng.normal(size=(100, 4)), rng.normal(size=(100, 4)) + 1
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def flaky(m, *a, **k):
        calls.append(m.copy())
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m, *a, **k)

    monkeypatch.setattr(M.scipy.linalg, "sqrtm", flaky)
    got = M.fid(xg, xr)
    Sg, Sr = np.cov(xg, rowvar=False), np.cov(xr, rowvar=False)
    E = 1e-4 * np.eye(4)
    assert np.allclose(calls[1], (Sr + E) @ (Sg + E))
    expect = (
        np.sum((xg.mean(0) - xr.mean(0)) ** 2)
        + np.trace(Sg)
        + np.trace(Sr)
        - 2 * np.trace(np.real(real_sqrtm((Sr + E) @ (Sg + E))))
    )
    assert got == pytest.approx(float(expect), rel=1e-10)


# ----------------------------------------------------------------------------- IS
def _textbook_is_loop(p):
    py = p.mean(0)
    return float(np.exp(np.mean([np.sum(r * np.log(r / py)) for r in p])))


def _paper_is_loop(p, seed=0):
    """Oracle written from the description: per class column of the first half, KL vs uniform."""
    n = len(p)
    h1 = p[np.random.RandomState(seed).permutation(n)[: n // 2]]
    kls = []
    for c in range(p.shape[1]):
        col = h1[:, c] / h1[:, c].sum()
        kls.append(sum(v * np.log(v * len(col)) for v in col if v > 0))
    return float(np.exp(np.mean(kls)))


def test_is_against_loops():
    p = _probs(301, seed=3)  # odd n: half1 has n // 2 rows
    assert M.inception_score(p, paper=False) == pytest.approx(_textbook_is_loop(p), rel=1e-12)
    assert M.inception_score(p, paper=True) == pytest.approx(_paper_is_loop(p), rel=1e-12)


def test_is_textbook_limits():
    C = 10
    confident = np.eye(C)[np.arange(200) % C] * (1 - 1e-9) + 1e-10
    assert M.inception_score(confident, paper=False) == pytest.approx(C, rel=1e-6)
    # paper IS of one-hot rows: exp(log n1 - mean_c log n_c), n_c the class counts in the kept half
    kept = (np.arange(200) % C)[np.random.RandomState(0).permutation(200)[:100]]
    n_c = np.bincount(kept, minlength=C)
    expect = np.exp(np.log(100) - np.mean(np.log(n_c)))
    assert M.inception_score(confident, paper=True) == pytest.approx(expect, rel=1e-6)
    assert expect > C  # the kept half is not exactly balanced
    same = np.tile(_probs(1, seed=4), (50, 1))
    assert M.inception_score(same, paper=False) == pytest.approx(1.0)
    assert M.inception_score(same, paper=True) == pytest.approx(1.0)


def test_paper_is_equals_textbook_when_balanced():
    """Exact: the kept half has equal class totals (cyclic shifts of one distribution) and the
    other half is the same multiset, so both conventions see the same balanced population."""
    C, n = 10, 400
    base = _softmax(np.random.default_rng(5).normal(size=(1, C)) * 3)[0]
    rows = np.stack([np.roll(base, k % C) for k in range(n // 2)])  # (200, C), column sums equal
    perm = np.random.RandomState(0).permutation(n)
    p = np.empty((n, C))
    p[perm[: n // 2]] = rows
    p[perm[n // 2 :]] = rows[::-1]
    paper, textbook = M.inception_score(p, paper=True), M.inception_score(p, paper=False)
    assert paper == pytest.approx(textbook, rel=1e-12)
    assert paper > 1.5
    # nearly: a large class-balanced sample from a noisy classifier
    q = _probs(4000, labels=np.arange(4000) % C, bonus=3.0, seed=6)
    assert M.inception_score(q, paper=True) == pytest.approx(
        M.inception_score(q, paper=False), rel=0.03
    )


def test_paper_is_exceeds_textbook_when_imbalanced():
    freqs = np.array([0.5, 0.2, 0.1, 0.05, 0.05, 0.04, 0.03, 0.01, 0.01, 0.01])
    labels = np.random.default_rng(7).choice(10, size=4000, p=freqs)
    p = _probs(4000, labels=labels, bonus=8.0, seed=8)  # a confident classifier
    paper, textbook = M.inception_score(p, paper=True), M.inception_score(p, paper=False)
    assert paper > 1.5 * textbook
    # analytically: log IS_paper - log IS_textbook = sum_c (pi_c - 1/C) H(x | c) on the kept half
    n = len(p)
    h1 = p[np.random.RandomState(0).permutation(n)[: n // 2]]
    pi = h1.sum(0) / len(h1)
    H = M.entropy(h1, axis=0)
    textbook_half = M.inception_score(h1, paper=False)
    assert np.log(paper) - np.log(textbook_half) == pytest.approx(np.sum((pi - 0.1) * H), rel=1e-9)


# ----------------------------------------------------------------------------- mIS
def test_mis_draws_equal_the_official_loop():
    """One vectorised randint gives the same pairs as the official per-iteration legacy calls."""
    saved = np.random.get_state()
    try:
        for n_rows in [1, 2, 3, 10, 600, 1000, 2816, 5120, 65537]:
            np.random.seed(0)
            loop = np.array([np.random.choice(n_rows, size=2, replace=True) for _ in range(2000)])
            vec = np.random.RandomState(0).randint(0, n_rows, size=(2000, 2))
            assert np.array_equal(loop, vec), n_rows
    finally:
        np.random.set_state(saved)


def test_mis_against_loop_and_exact():
    from scipy.stats import entropy

    p = _probs(60, seed=9)
    rs = np.random.RandomState(0)
    kls = []
    for _ in range(2000):
        i, j = rs.choice(len(p), size=2, replace=True)
        kls.append(entropy(p[i], p[j]))
    assert M.modified_inception_score(p, n=2000) == pytest.approx(
        float(np.exp(np.mean(kls))), rel=1e-12
    )
    # exact mean over all ordered pairs: brute force
    brute = np.exp(np.mean([[entropy(a, b) for b in p] for a in p]))
    assert M.modified_inception_score_exact(p) == pytest.approx(brute, rel=1e-10)
    # with exact zeros: KL is infinite where p_i > 0 and p_j = 0
    z = np.array([[1.0, 0.0], [0.5, 0.5]])
    assert M.modified_inception_score_exact(z) == np.inf


def test_mis_estimate_close_to_exact(fx):
    for key in ["genA_probs", "genB_probs", "train_probs"]:
        est, exact = M.modified_inception_score(fx[key]), M.modified_inception_score_exact(fx[key])
        assert est == pytest.approx(exact, rel=0.03), key


# ----------------------------------------------------------------------------- AM
def test_am_by_hand():
    ref = np.array([[0.9, 0.1], [0.2, 0.8]])
    gen = np.array([[0.5, 0.5], [1.0, 0.0], [0.7, 0.3]])
    mr, mg = ref.mean(0), gen.mean(0)  # (0.55, 0.45), (0.7333.., 0.2666..)
    kl = mr[0] * np.log(mr[0] / mg[0]) + mr[1] * np.log(mr[1] / mg[1])
    h = np.mean([np.log(2), 0.0, -(0.7 * np.log(0.7) + 0.3 * np.log(0.3))])
    assert M.am_score(ref, gen) == pytest.approx(kl + h, rel=1e-12)


# ----------------------------------------------------------------------------- NDB
def test_ndb_sanity():
    rng = np.random.default_rng(10)
    ref = rng.normal(size=(2000, 4))
    same = rng.normal(size=(2000, 4))
    shifted = rng.normal(size=(2000, 4)) * 0.5 + 1.0
    assert M.ndb_score(ref, same, k=20) <= 0.15
    assert M.ndb_score(ref, shifted, k=20) >= 0.5
    centroids, labels = M.kmeans(ref, 20, seed=0)
    assert centroids.shape == (20, 4) and labels.shape == (2000,)
    assert np.array_equal(M.kmeans(ref, 20, seed=0)[1], labels)  # seeded


# ----------------------------------------------------------------------------- protocol
def test_select_paper_subset_sizes_and_content():
    rng = np.random.default_rng(11)
    ll = rng.normal(size=10240)
    idx = M.select_paper_subset(ll)
    assert len(idx) == 2816 and len(np.unique(idx)) == 2816
    assert np.array_equal(idx, np.sort(idx))
    assert np.array_equal(idx, M.select_paper_subset(ll, seed=0))
    assert not np.array_equal(idx, M.select_paper_subset(ll, seed=1))
    held = np.random.RandomState(0).permutation(10240)[:5120]
    assert set(idx) <= set(held)
    ranks = np.argsort(np.argsort(ll[held], kind="stable"), kind="stable")  # rank within held half
    kept = ranks[np.isin(held, idx)]
    assert kept.min() == 2048 and kept.max() == 5120 - 256 - 1
    assert ll[idx].min() >= np.sort(ll[held])[2048] and ll[idx].max() <= np.sort(ll[held])[4863]
    for n, expect in [(2, 1), (16, 5), (2048, 564), (10241, 2816)]:
        assert len(M.select_paper_subset(np.arange(n, dtype=float))) == expect
