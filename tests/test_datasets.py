"""Datasets over the prepared layout: chunking, shift, padding, collate, TBPTT windows, real data."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from sashimi.data import prepare as P
from sashimi.data.datasets import (
    IGNORE_INDEX,
    AutoregressiveDataset,
    WaveformDataset,
    collate_autoregressive,
    load_split,
    make_loader,
    tbptt_chunks,
)
from sashimi.data.quantize import ZERO_TOKEN, encode
from sashimi.errors import UserError


def _write_prepared(
    folder: Path, clips: dict[str, list[np.ndarray]], labels: dict[str, list[int]] | None = None
) -> Path:
    """The contract's layout, written directly (independent of `prepare`)."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, xs in clips.items():
        audio = np.concatenate(xs).astype(np.float32) if xs else np.zeros(0, np.float32)
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in xs])]).astype(np.int64)
        np.save(folder / f"{split}.audio.npy", audio)
        np.save(folder / f"{split}.offsets.npy", offsets)
        if labels is not None:
            np.save(folder / f"{split}.labels.npy", np.array(labels[split], dtype=np.int64))
        splits[split] = {"clips": len(xs), "samples": int(offsets[-1])}
    manifest = {
        "dataset": "toy",
        "source": "test",
        "sample_rate": 16000,
        "splits": splits,
        "inputs_sha256": "",
        "skipped": [],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _noise(n: int, seed: int) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(n)).clip(-1, 1).astype(np.float32)


def test_youtubemix_like_chunk_count(tmp_path):
    d = _write_prepared(tmp_path / "ytm", {"train": [_noise(960_000, 0), _noise(960_000, 1)]})
    s = load_split(d, "train")
    ds = AutoregressiveDataset(s, "mu-law", chunk_length=131_072)
    assert len(ds) == 14  # 7 chunks per 60 s clip, remainder dropped
    assert ds.starts.tolist() == [k * 131_072 for k in range(7)] + [
        960_000 + k * 131_072 for k in range(7)
    ]
    x, y = ds[8]  # second chunk of the second clip
    chunk = torch.from_numpy(s.audio[960_000 + 131_072 : 960_000 + 2 * 131_072].copy())
    assert torch.equal(y, encode(chunk, "mu-law"))  # quantised per chunk (min-max over the chunk)
    assert x.shape == y.shape == (131_072,)


def test_shift_and_context_padding(tmp_path):
    d = _write_prepared(tmp_path / "d", {"train": [_noise(1000, 0), _noise(300, 1)]})
    s = load_split(d, "train")
    for kind in ("mu-law", "linear"):
        x, y = AutoregressiveDataset(s, kind)[0]
        assert y.dtype == x.dtype == torch.int64
        assert torch.equal(y, encode(torch.from_numpy(s.clip(0)), kind))
        assert int(x[0]) == ZERO_TOKEN and torch.equal(x[1:], y[:-1])
    x, y = AutoregressiveDataset(s, "linear", context=7)[1]
    assert x.shape == (307,) and y.shape == (300,)
    assert (x[:8] == ZERO_TOKEN).all() and torch.equal(x[8:], y[:-1])
    ds = AutoregressiveDataset(s, "linear", chunk_length=400, context=3)
    assert len(ds) == 2  # 1000 -> 2 chunks, 300 -> none
    x, y = ds[1]
    assert torch.equal(y, encode(torch.from_numpy(s.audio[400:800].copy()), "linear"))
    assert x.shape == (403,) and (x[:4] == ZERO_TOKEN).all()


def test_collate_pads_x_with_128_and_y_with_ignore_index(tmp_path):
    d = _write_prepared(
        tmp_path / "d", {"train": [_noise(16000, 0), _noise(12971, 1), _noise(50, 2)]}
    )
    ds = AutoregressiveDataset(load_split(d, "train"), "mu-law", context=2)
    x, y = collate_autoregressive([ds[0], ds[1], ds[2]])
    assert x.shape == (3, 16002) and y.shape == (3, 16000)
    assert (x[1, 2 + 12971 :] == ZERO_TOKEN).all() and (y[1, 12971:] == IGNORE_INDEX).all()
    assert torch.equal(y[1, :12971], ds[1][1]) and torch.equal(x[1, : 2 + 12971], ds[1][0])
    assert (y[2, 50:] == IGNORE_INDEX).all() and (y[0] >= 0).all()
    _, y = collate_autoregressive([ds[2]], ignore_index=-1)
    assert y.shape == (1, 50)


def test_waveform_dataset_pads_and_trims(tmp_path):
    clips = [_noise(20000, 0), _noise(12000, 1)]
    d = _write_prepared(tmp_path / "d", {"train": clips}, labels={"train": [3, 7]})
    s = load_split(d, "train")
    ds = WaveformDataset(s, 16000)
    a, b = ds[0], ds[1]
    assert a.dtype == torch.float32 and a.shape == b.shape == (16000,)
    assert torch.equal(a, torch.from_numpy(clips[0][:16000]))
    assert torch.equal(b[:12000], torch.from_numpy(clips[1])) and (b[12000:] == 0).all()
    x, label = WaveformDataset(s, 16000, return_label=True)[1]
    assert label == 7 and torch.equal(x, b)


def test_tbptt_windows_cover_targets_with_context_overlap():
    B, L, c, chunk = 2, 2500, 31, 1024
    y = torch.randint(0, 256, (B, L))
    x = torch.cat([torch.full((B, c + 1), ZERO_TOKEN), y[:, :-1]], dim=1)  # (B, c + L)
    windows = list(tbptt_chunks(x, y, chunk, context=c))
    assert [w[1].shape[1] for w in windows] == [1024, 1024, 452]
    assert torch.equal(torch.cat([w[1] for w in windows], dim=1), y)
    for i, (xw, yw) in enumerate(windows):
        s = i * chunk
        assert xw.shape[1] == c + yw.shape[1]
        assert torch.equal(xw, x[:, s : s + c + yw.shape[1]])
        # the last input of the window predicts its last target: x[c + t] = y[t - 1]
        assert torch.equal(xw[:, c + 1 :], yw[:, :-1])
    # consecutive windows overlap by exactly the context
    assert torch.equal(windows[0][0][:, -c:], windows[1][0][:, :c])
    with pytest.raises(ValueError):
        next(tbptt_chunks(x[:, 1:], y, chunk, context=c))


def test_load_split_errors_and_pickling(tmp_path):
    with pytest.raises(UserError, match="missing; run `sashimi prepare`"):
        load_split(tmp_path, "train")
    d = _write_prepared(tmp_path / "d", {"train": [_noise(100, 0)]})
    with pytest.raises(UserError, match="unknown split"):
        load_split(d, "dev-other")
    s = load_split(d, "val" if (d / "validation.audio.npy").exists() else "train")
    assert s.labels.tolist() == [-1] and s.names == ["train/0"]
    _ = s.audio  # open the memmap, then pickle: the memmap is not shipped
    s2 = pickle.loads(pickle.dumps(s))
    assert s2._audio is None and np.array_equal(s2.clip(0), s.clip(0))
    np.save(d / "train.offsets.npy", np.array([0, 99], dtype=np.int64))
    with pytest.raises(UserError, match="offsets end at 99"):
        load_split(d, "train")


def test_make_loader_with_worker(tmp_path):
    d = _write_prepared(
        tmp_path / "d",
        {"train": [_noise(5000, i) for i in range(6)], "validation": [_noise(900, 9)]},
    )
    dl = make_loader(
        d, "train", quantization="linear", chunk_length=2000, batch_size=4, num_workers=1, seed=0
    )
    batches = list(dl)
    assert [tuple(b[0].shape) for b in batches] == [(4, 2000), (4, 2000), (4, 2000)]
    again = [
        b[1]
        for b in make_loader(
            d, "train", quantization="linear", chunk_length=2000, batch_size=4, seed=0
        )
    ]
    assert all(torch.equal(a[1], b) for a, b in zip(batches, again))  # same seed, same order
    (w,) = list(make_loader(d, "validation", kind="waveform", length=1000, batch_size=2))
    assert w.shape == (1, 1000)
    with pytest.raises(UserError, match="no items"):
        make_loader(d, "validation", chunk_length=2000)


# ----------------------------------------------------------------------------- real audio


def test_sc09_sample_through_datasets(shared_data_dir, tmp_path):
    src = shared_data_dir / "sc09_sample"
    if not src.is_dir():
        pytest.skip(f"{src} missing")
    P.prepare("sc09", src, tmp_path / "sc09", progress=False)
    assert len(load_split(tmp_path / "sc09", "test")) == 22
    s = load_split(tmp_path / "sc09", "train")  # some train clips are shorter than 1 s
    ds = AutoregressiveDataset(s, "mu-law")
    short = int(np.argmin(s.lengths))
    n = int(s.lengths[short])
    x, y = collate_autoregressive([ds[0], ds[short], ds[1]])
    assert n < 16000 and x.shape == y.shape == (3, 16000)
    assert (y[1, n:] == IGNORE_INDEX).all() and (x[1, n:] == ZERO_TOKEN).all()
    assert torch.equal(y[1, :n], encode(torch.from_numpy(s.clip(short)), "mu-law"))
    w = WaveformDataset(s, 16000, return_label=True)
    assert sorted({w[i][1] for i in range(len(s))}) <= list(range(10))


def test_fsdd_subset_through_datasets(shared_data_dir, tmp_path):
    src = shared_data_dir / "fsdd" / "recordings"
    if not src.is_dir():
        pytest.skip(f"{src} missing")
    rec = tmp_path / "raw" / "recordings"
    rec.mkdir(parents=True)
    for digit in range(10):
        for take in (2, 7, 20):
            shutil.copy(src / f"{digit}_jackson_{take}.wav", rec)
    P.prepare("fsdd", tmp_path / "raw", tmp_path / "fsdd", progress=False)
    for split in ("train", "validation", "test"):
        s = load_split(tmp_path / "fsdd", split)
        assert sorted(s.labels.tolist()) == list(range(10))
    ds = WaveformDataset(load_split(tmp_path / "fsdd", "train"), 16000, return_label=True)
    x, label = ds[0]
    assert x.shape == (16000,) and label == 0 and x.abs().max() > 0.01
    xs, ys = collate_autoregressive(
        [AutoregressiveDataset(ds.split, "mu-law")[i] for i in range(3)]
    )
    assert xs.shape[0] == 3 and (ys >= IGNORE_INDEX).all()


def test_piano_20s_through_datasets(shared_data_dir, tmp_path):
    src = shared_data_dir / "piano"
    oggs = sorted(src.glob("*.ogg")) if src.is_dir() else []
    if not oggs:
        pytest.skip(f"{src} has no .ogg files")
    folder = tmp_path / "raw"
    folder.mkdir()
    for i, ogg in enumerate(oggs[:2]):
        with sf.SoundFile(ogg) as f:  # 10 s of each recording, kept at 44.1 kHz stereo
            x = f.read(frames=10 * f.samplerate, dtype="float32")
            sf.write(folder / f"piece{i}.flac", x, f.samplerate)
    P.prepare("folder", folder, tmp_path / "piano", progress=False)
    s = load_split(tmp_path / "piano", "train")
    assert len(s) == 1 and s.lengths[0] == 160_000  # 10 s at 16 kHz, mono
    ds = AutoregressiveDataset(s, "linear", chunk_length=16_000)
    assert len(ds) == 10
    x, y = ds[3]
    assert int(y.min()) == 0 and int(y.max()) == 255 and int(x[0]) == ZERO_TOKEN
