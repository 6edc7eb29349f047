"""Deterministic synthetic stand-ins for the real datasets (demo scale, no download).

* `synth-digits` stands in for SC09: ten classes of one-second, speech-like "words". Each
  class is a fixed sequence of phoneme-like segments (fricative / burst / vowel / nasal)
  with vowel-like formant paths that glide between targets, and a class pitch contour.
  Every clip draws its own speaker (pitch +-20 %, vocal-tract length +-15 %), speed
  (+-10 %), microphone colouring (tilt, low-pass), loudness, onset and background noise,
  so classes overlap in pitch and long-term spectrum and a classifier has to use the
  time course of the formants and noise bands.
* `synth-piano` stands in for Beethoven / YouTubeMix: polyphonic piano-like music, additive
  synthesis of slightly inharmonic partials (f_n = n f0 sqrt(1 + B n^2)) with a two-stage
  decay, melodies on a random scale, chords, a bass line and a random tempo.

Every clip i has its own RNG `np.random.default_rng([seed, stream, i])`: clips are independent.
"""

from __future__ import annotations

import numpy as np

from sashimi.io import SAMPLE_RATE as SR

DIGIT_LENGTH = SR  # one second
N_DIGITS = 10

# Vowel-like formant targets (F1, F2, F3 in Hz) and relative formant gains (g1, g2, g3).
_TARGETS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "i": ((280, 2250, 2900), (1.0, 0.35, 0.30)),
    "I": ((400, 1900, 2550), (1.0, 0.45, 0.25)),
    "e": ((480, 2000, 2600), (1.0, 0.50, 0.25)),
    "E": ((580, 1800, 2500), (1.0, 0.50, 0.25)),
    "a": ((750, 1200, 2500), (1.0, 0.70, 0.20)),
    "o": ((500, 900, 2400), (1.0, 0.60, 0.15)),
    "u": ((320, 900, 2300), (1.0, 0.35, 0.10)),
    "r": ((480, 1300, 1650), (1.0, 0.60, 0.50)),
    "@": ((520, 1450, 2500), (1.0, 0.50, 0.20)),
    "n": ((260, 1600, 2600), (1.0, 0.06, 0.04)),  # nasal murmur: almost only F1
}

# A segment: (kind, relative duration, detail). kind "v" = voiced target (detail = target
# name, nasal "n" is quieter); "f" = fricative (low Hz, high Hz, level, voiced fraction);
# "b" = stop burst (low Hz, high Hz, level) preceded by a short closure.
_WORDS: list[list[tuple]] = [
    [
        ("f", 0.22, (3500, 7500, 0.35, 0.4)),
        ("v", 0.18, "i"),
        ("v", 0.18, "r"),
        ("v", 0.42, "o"),
    ],  # zero
    [("v", 0.30, "u"), ("v", 0.42, "a"), ("v", 0.28, "n")],  # one
    [("b", 0.10, (2500, 6500, 0.8)), ("v", 0.90, "u")],  # two
    [("f", 0.22, (1500, 7000, 0.12, 0.0)), ("v", 0.28, "r"), ("v", 0.50, "i")],  # three
    [("f", 0.25, (1200, 6500, 0.18, 0.0)), ("v", 0.45, "o"), ("v", 0.30, "r")],  # four
    [
        ("f", 0.20, (1200, 6500, 0.18, 0.0)),
        ("v", 0.40, "a"),
        ("v", 0.25, "i"),
        ("f", 0.15, (1500, 6000, 0.12, 0.5)),
    ],  # five
    [
        ("f", 0.26, (4000, 7800, 0.45, 0.0)),
        ("v", 0.30, "I"),
        ("b", 0.08, (2000, 5000, 0.5)),
        ("f", 0.36, (4000, 7800, 0.45, 0.0)),
    ],  # six
    [
        ("f", 0.20, (4000, 7800, 0.45, 0.0)),
        ("v", 0.30, "E"),
        ("f", 0.08, (1500, 6000, 0.10, 0.6)),
        ("v", 0.20, "@"),
        ("v", 0.22, "n"),
    ],  # seven
    [("v", 0.45, "e"), ("v", 0.33, "i"), ("b", 0.22, (2500, 6500, 0.6))],  # eight
    [("v", 0.20, "n"), ("v", 0.42, "a"), ("v", 0.18, "i"), ("v", 0.20, "n")],  # nine
]
# Class pitch contour (f0 multiplier at word start, middle, end) and nominal word length (s).
_CONTOURS = [(1.10, 1.05, 0.85), (1.00, 1.08, 0.88), (1.15, 1.00, 0.80), (1.05, 1.10, 0.90), (1.12, 1.00, 0.86),
             (1.00, 1.12, 0.84), (1.08, 1.02, 0.92), (1.10, 1.06, 0.82), (1.04, 1.10, 0.86), (1.00, 1.10, 0.85)]  # fmt: skip
_WORD_SECONDS = [0.62, 0.50, 0.42, 0.50, 0.50, 0.60, 0.62, 0.64, 0.45, 0.55]
_BANDWIDTHS = np.array([90.0, 110.0, 160.0])  # formant bandwidths (Hz)


def _smooth(x: np.ndarray, ms: float) -> np.ndarray:
    """Smooth a control curve with a Hann window of `ms` milliseconds."""
    n = max(3, int(SR * ms / 1000) | 1)
    w = np.hanning(n)
    return np.convolve(x, w / w.sum(), mode="same")


def _band_noise(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """White noise band-limited to [lo, hi] Hz with soft edges (FFT shaping), unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))  # (n//2+1,)
    f = np.fft.rfftfreq(n, 1 / SR)  # (n//2+1,)
    gain = 1 / (1 + np.exp(-(f - lo) / 150)) / (1 + np.exp((f - hi) / 300))
    x = np.fft.irfft(spec * gain, n)  # (n,)
    return x / (x.std() + 1e-12)


def _channel(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random microphone / room colouring: spectral tilt above 500 Hz and a soft low-pass."""
    f = np.fft.rfftfreq(len(x), 1 / SR)  # (n//2+1,)
    tilt_db = rng.uniform(-5.0, 2.0) * np.log2(np.maximum(f, 500.0) / 500.0)
    gain = 10 ** (tilt_db / 20) / np.sqrt(1 + (f / rng.uniform(3500, 8000)) ** 8)
    return np.fft.irfft(np.fft.rfft(x) * gain, len(x))


def digit_clip(i: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """Clip i of synth-digits: (float32 (16000,) in [-1, 1], label = i % 10)."""
    label = i % N_DIGITS
    rng = np.random.default_rng([seed, 1, i])
    f0_speaker = 150.0 * rng.uniform(0.8, 1.2)  # same range for every class
    tract = rng.uniform(0.85, 1.15)  # formant scale (vocal-tract length)
    speed = rng.uniform(0.9, 1.1)
    Lw = int(_WORD_SECONDS[label] * speed * SR)  # word length in samples

    # Segment boundaries, with +-15 % jitter of each segment's share.
    segs = _WORDS[label]
    share = np.array([s[1] for s in segs]) * rng.uniform(0.85, 1.15, len(segs))
    edges = np.concatenate([[0], np.cumsum(share / share.sum())]) * Lw  # (S+1,)
    t = np.arange(Lw)  # (Lw,)
    knots, F_knots, g_knots, voicing, noise = _segments(segs, edges, Lw, tract, rng)
    F_t = np.stack([np.interp(t, knots, [F[k] for F in F_knots]) for k in range(3)])  # (3, Lw)
    g_t = np.stack([np.interp(t, knots, [g[k] for g in g_knots]) for k in range(3)])  # (3, Lw)
    voicing = _smooth(voicing, 25)  # (Lw,)

    # Pitch: class contour through three points, speaker scale, slow vibrato and jitter.
    c = np.array(_CONTOURS[label]) * rng.uniform(0.95, 1.05, 3)
    contour = np.interp(t, [0, Lw / 2, Lw - 1], c)  # (Lw,)
    wander = _smooth(rng.standard_normal(Lw), 60) * 0.6  # (Lw,) slow random pitch drift
    f0 = (
        f0_speaker * contour * (1 + 0.01 * np.sin(2 * np.pi * rng.uniform(4, 6) * t / SR) + wander)
    )  # (Lw,)

    voiced = _harmonics(f0, F_t, g_t, tract, rng)  # (Lw,)
    word = _channel(voicing * voiced + noise, rng)  # (Lw,)
    word /= np.abs(word).max() + 1e-12

    # Place the word, set loudness, add background noise at a random SNR.
    x = np.zeros(DIGIT_LENGTH)
    onset = int(rng.uniform(0.02, max(0.021, 1 - Lw / SR - 0.02)) * SR)
    n = min(Lw, DIGIT_LENGTH - onset)
    x[onset : onset + n] = word[:n] * rng.uniform(0.25, 0.9)
    rms = np.sqrt(np.mean(word[:n] ** 2)) * np.abs(x).max()
    x += rng.standard_normal(DIGIT_LENGTH) * rms * 10 ** (-rng.uniform(15, 35) / 20)
    x /= max(1.0, np.abs(x).max() / 0.99)
    return x.astype(np.float32), label


def _segments(segs, edges: np.ndarray, Lw: int, tract: float, rng: np.random.Generator):
    """The word's segments: formant knots at the centres of voiced segments (linear glides
    between them), the voicing level (Lw,) and the fricative / stop noise (Lw,)."""
    knots, F_knots, g_knots = [], [], []
    voicing = np.zeros(Lw)
    noise = np.zeros(Lw)
    for s, (kind, _, detail) in enumerate(segs):
        a, b = int(edges[s]), int(edges[s + 1])
        if kind == "v":
            F, g = _TARGETS[detail]
            knots.append((a + b) / 2)
            F_knots.append(np.array(F) * tract * rng.uniform(0.95, 1.05, 3))
            g_knots.append(g)
            voicing[a:b] = 0.35 if detail == "n" else 1.0
        elif kind == "f":
            lo, hi, level, voiced = detail
            voicing[a:b] = voiced * 0.5
            env = np.zeros(Lw)
            env[a:b] = 1.0
            noise += (
                level
                * rng.uniform(0.7, 1.3)
                * _smooth(env, 20)
                * _band_noise(rng, Lw, lo * tract, hi)
            )
        else:  # stop: ~30 ms closure, then a decaying burst
            lo, hi, level = detail
            start = min(b - 1, a + int(0.03 * SR))
            env = np.zeros(Lw)
            env[start:b] = np.exp(-np.arange(b - start) / (0.012 * SR))
            noise += level * rng.uniform(0.7, 1.3) * env * _band_noise(rng, Lw, lo, hi)
    return knots, F_knots, g_knots, voicing, noise


def _harmonics(f0, F_t, g_t, tract: float, rng: np.random.Generator) -> np.ndarray:
    """Harmonic source (Lw,) at pitch f0 (Lw,), shaped by the formant envelope (F_t, g_t:
    (3, Lw)) evaluated at every harmonic; peak-normalised."""
    # (K, Lw) arrays in float32: phase errors stay below 1e-2 rad.
    K = int(7000 / f0.min())
    k = np.arange(1, K + 1, dtype=np.float32)[:, None]  # (K, 1)
    fk = k * f0.astype(np.float32)[None, :]  # (K, Lw) harmonic frequencies
    env = np.zeros_like(fk)
    for j in range(3):
        bw = np.float32(_BANDWIDTHS[j] * tract / 2)
        env += g_t[j].astype(np.float32) / (
            1 + np.square((fk - F_t[j].astype(np.float32)) / bw)
        )  # (K, Lw)
    env *= (fk < 7500) / k  # band limit; -6 dB/octave source slope
    phase = (2 * np.pi * np.cumsum(f0) / SR).astype(np.float32)  # (Lw,)
    offset = rng.uniform(0, 2 * np.pi, (K, 1)).astype(np.float32)  # (K, 1)
    voiced = (env * np.sin(k * phase[None, :] + offset)).sum(0, dtype=np.float64)  # (Lw,)
    voiced /= np.abs(voiced).max() + 1e-12
    return voiced


def generate_digits(n_clips: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """n_clips one-second synth-digits clips and their labels (int64, clip i has label i % 10)."""
    clips = [digit_clip(i, seed) for i in range(n_clips)]
    return [c for c, _ in clips], np.array([lab for _, lab in clips], dtype=np.int64)


# ----------------------------------------------------------------------------- piano

_SCALES = {
    "major": [0, 2, 4, 5, 7, 9, 11],
    "minor": [0, 2, 3, 5, 7, 8, 11],
    "dorian": [0, 2, 3, 5, 7, 9, 10],
}


def _piano_note(midi: int, velocity: float, held: float, rng: np.random.Generator) -> np.ndarray:
    """One piano-like note: inharmonic partials, two-stage decay, damper release after `held` s."""
    f0 = 440.0 * 2 ** ((midi - 69) / 12)
    B = 1e-4 * 2 ** ((midi - 60) / 18)  # inharmonicity grows towards the treble
    n = np.arange(1, 17)[:, None]  # (P, 1)
    fn = n * f0 * np.sqrt(1 + B * n**2)  # (P, 1) partial frequencies
    keep = fn[:, 0] < 7000
    n, fn = n[keep], fn[keep]
    L = int((held + 0.25) * SR)
    t = np.arange(L)[None, :] / SR  # (1, L)
    tau = 2.5 * 2 ** (-(midi - 48) / 18) / (1 + 0.35 * (n - 1))  # (P, 1) decay times
    amp = velocity ** (0.8 + 0.15 * n) / n ** (1.6 - 0.6 * velocity)  # louder = brighter
    amp = amp * np.abs(np.sin(np.pi * n / 7.3))  # hammer striking near 1/7 of the string
    decay = 0.65 * np.exp(-t / (0.25 * tau)) + 0.35 * np.exp(-t / tau)  # (P, L)
    detune = 1 + rng.normal(0, 3e-4, fn.shape)  # two slightly detuned strings -> beating
    phase = rng.uniform(0, 2 * np.pi, fn.shape)
    arg = (2 * np.pi * fn * t + phase).astype(np.float32)  # (P, L); float32 sines are twice as fast
    arg2 = (2 * np.pi * fn * detune * t + phase).astype(np.float32)  # (P, L)
    x = ((amp * decay).astype(np.float32) * (np.sin(arg) + np.sin(arg2))).sum(
        0, dtype=np.float64
    )  # (L,)
    x *= np.minimum(1.0, np.arange(L) / (0.003 * SR))  # 3 ms attack
    x *= np.where(t[0] > held, np.exp(-(t[0] - held) / 0.06), 1.0)  # damper
    return x


def piano_clip(i: int, seconds: float = 8.0, seed: int = 0) -> np.ndarray:
    """Clip i of synth-piano: float32 (seconds * 16000,) in [-1, 1]."""
    rng = np.random.default_rng([seed, 2, i])
    L = int(seconds * SR)
    out = np.zeros(L + 3 * SR)
    beat = 60.0 / rng.uniform(70, 160)
    root = int(rng.integers(48, 61))
    scale = _SCALES[rng.choice(list(_SCALES))]
    pitches = np.array([root + 12 * o + s for o in range(-2, 4) for s in scale])  # playable notes
    deg = int(np.searchsorted(pitches, root + 12))  # melody starts an octave above the root

    def add(t0: float, midi: int, vel: float, held: float) -> None:
        note = _piano_note(midi, vel, held, rng)
        a = int(t0 * SR)
        b = min(len(out), a + len(note))
        out[a:b] += note[: b - a]

    t = 0.0
    while t < seconds:  # right hand: random walk on the scale, sometimes a triad
        dur = beat * rng.choice([0.5, 1, 1, 1.5, 2])
        deg = int(np.clip(deg + rng.integers(-3, 4), 14, len(pitches) - 5))
        vel = rng.uniform(0.35, 1.0)
        add(t, int(pitches[deg]), vel, dur)
        if rng.random() < 0.3:
            for step in (2, 4):
                add(t, int(pitches[deg - step]), vel * 0.8, dur)
        t += dur
    t = 0.0
    while t < seconds:  # left hand: root or fifth below, every two beats
        deg_bass = int(np.clip(deg - 14 + rng.choice([0, 4]), 0, len(pitches) - 1))
        add(t, int(pitches[deg_bass]), rng.uniform(0.3, 0.7), 2 * beat)
        t += 2 * beat
    x = out[:L]
    x *= rng.uniform(0.5, 0.95) / (np.abs(x).max() + 1e-12)
    return x.astype(np.float32)


def generate_piano(n_clips: int, seconds: float = 8.0, seed: int = 0) -> list[np.ndarray]:
    """n_clips synth-piano clips of `seconds` each."""
    return [piano_clip(i, seconds, seed) for i in range(n_clips)]
