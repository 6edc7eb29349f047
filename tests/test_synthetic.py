"""Synthetic stand-ins: deterministic, well-formed, classes differ but vary within."""

from __future__ import annotations

import numpy as np
import pytest

from sashimi.data import synthetic as S


@pytest.fixture(scope="module")
def digits():
    return S.generate_digits(60, seed=0)  # 6 clips per class


def _log_spectrum(x: np.ndarray) -> np.ndarray:
    frames = x.reshape(50, 320) * np.hanning(320)  # 20 ms frames
    return np.log(np.mean(np.abs(np.fft.rfft(frames, axis=1)) ** 2, axis=0) + 1e-8)[::4]  # (41,)


def test_digits_shapes_and_range(digits):
    clips, labels = digits
    assert len(clips) == 60 and labels.dtype == np.int64
    assert labels.tolist() == [i % 10 for i in range(60)]
    for x in clips:
        assert x.shape == (16000,) and x.dtype == np.float32
        assert np.isfinite(x).all() and np.abs(x).max() <= 1.0
        assert np.abs(x).max() > 0.1  # audible


def test_digits_deterministic(digits):
    clips, _ = digits
    again, _ = S.generate_digits(12, seed=0)  # clip i does not depend on n_clips
    for a, b in zip(clips[:12], again):
        assert np.array_equal(a, b)
    other, _ = S.generate_digits(3, seed=1)
    assert not np.array_equal(other[0], clips[0])


def test_digit_classes_differ_but_vary_within(digits):
    clips, labels = digits
    F = np.stack([_log_spectrum(x) for x in clips])  # (60, 41)
    centroids = np.stack([F[labels == k].mean(0) for k in range(10)])  # (10, 41)
    between = np.mean(
        [np.linalg.norm(centroids[a] - centroids[b]) for a in range(10) for b in range(a + 1, 10)]
    )
    within = np.mean([np.linalg.norm(F[i] - centroids[labels[i]]) for i in range(60)])
    assert between > 1.0  # classes have different average spectra
    assert within > 0.25 * between  # ...but clips of one class vary a lot (speaker, channel, noise)
    # leave-one-out nearest centroid on the long-term spectrum: learnable, not solved
    hits = 0
    for i in range(60):
        keep = np.arange(60) != i
        c = np.stack([F[keep & (labels == k)].mean(0) for k in range(10)])
        hits += int(np.argmin(np.linalg.norm(c - F[i], axis=1)) == labels[i])
    assert 0.2 < hits / 60 < 0.95
    # same class, different clips: genuinely different waveforms
    assert np.corrcoef(clips[0], clips[10])[0, 1] < 0.5


def test_piano(tmp_path):
    a = S.generate_piano(2, seconds=2.0, seed=0)
    b = S.generate_piano(2, seconds=2.0, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], a[1])
    for x in a:
        assert x.shape == (32000,) and x.dtype == np.float32
        assert np.isfinite(x).all() and 0.4 < np.abs(x).max() <= 1.0
    # decaying notes: the envelope moves (onsets and decays), it is not a steady tone
    env = np.abs(a[0]).reshape(40, 800).max(1)
    assert env.std() / env.mean() > 0.1
    # inharmonic partials: f_n = n f0 sqrt(1 + B n^2) sits above n f0
    note = S._piano_note(60, 0.8, 1.0, np.random.default_rng(0))
    spec = np.abs(np.fft.rfft(note[:16000] * np.hanning(16000)))
    f0 = 440 * 2 ** (-9 / 12)
    peak8 = np.argmax(spec[int(7.9 * f0) : int(8.2 * f0)]) + int(7.9 * f0)  # 1 Hz bins
    assert peak8 > 8 * f0
