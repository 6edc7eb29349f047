"""`sashimi prepare`: split rules, resampling, the memmap layout, manifest, atomic replace, bad files."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import shutil
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sashimi.data import download as D
from sashimi.data import prepare as P
from sashimi.errors import UserError

SR = 16000


def _wav(
    path: Path,
    n: int = 1600,
    sr: int = SR,
    channels: int = 1,
    seed: int = 0,
    fmt: str | None = None,
) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = (
        (0.5 * np.random.default_rng(seed).standard_normal((n, channels)))
        .clip(-1, 1)
        .astype(np.float32)
    )
    sf.write(path, x, sr, format=fmt)
    return x


def _sc09_tree(root: Path, per_digit: int = 3) -> None:
    """A tiny Speech Commands layout: per digit `per_digit` clips; lists include non-digit words."""
    val, test = ["bed/x_nohash_0.wav"], ["dog/y_nohash_0.wav"]
    for d, word in enumerate(P.DIGITS):
        for k in range(per_digit):
            _wav(root / word / f"spk{k}_nohash_{k}.wav", n=SR - 100 * k, seed=10 * d + k)
        val.append(f"{word}/spk1_nohash_1.wav")
        test.append(f"{word}/spk2_nohash_2.wav")
    _wav(root / "bed" / "x_nohash_0.wav")  # a non-digit word: ignored
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_sc09_sample_prepares_to_62_16_22(shared_data_dir, tmp_path):
    src = shared_data_dir / "sc09_sample"
    if not src.is_dir():
        pytest.skip(f"{src} missing")
    out = tmp_path / "sc09"
    m = P.prepare("sc09", src, out, progress=False)
    assert {s: m["splits"][s]["clips"] for s in P.SPLITS} == {
        "train": 62,
        "validation": 16,
        "test": 22,
    }
    assert m["sample_rate"] == 16000 and m["dataset"] == "sc09" and m["skipped"] == []
    assert m == _manifest(out)
    for split in P.SPLITS:
        audio = np.load(out / f"{split}.audio.npy", mmap_mode="r")
        offsets = np.load(out / f"{split}.offsets.npy")
        labels = np.load(out / f"{split}.labels.npy")
        names = (out / f"{split}.names.txt").read_text().splitlines()
        assert audio.dtype == np.float32 and offsets.dtype == np.int64 and labels.dtype == np.int64
        assert offsets[0] == 0 and offsets[-1] == len(audio) == m["splits"][split]["samples"]
        assert np.all(np.diff(offsets) <= 16000) and np.all(np.diff(offsets) >= 12971)
        assert len(labels) == len(names) == len(offsets) - 1
        assert all(P.DIGITS[lab] == n.split("/")[0] for lab, n in zip(labels, names))
        assert np.isfinite(audio).all() and np.abs(audio).max() <= 1
    # the first clip is the file, sample for sample
    names = (out / "train.names.txt").read_text().splitlines()
    ref, _ = sf.read(src / names[0], dtype="float32")
    offsets = np.load(out / "train.offsets.npy")
    assert np.array_equal(np.load(out / "train.audio.npy")[: offsets[1]], ref)


def test_sc09_layout_splits_by_lists(tmp_path):
    _sc09_tree(tmp_path / "raw" / "sc09")  # nested one level: the root is found
    m = P.prepare("speech-commands-v2", tmp_path / "raw", tmp_path / "out", progress=False)
    assert {s: m["splits"][s]["clips"] for s in P.SPLITS} == {
        "train": 10,
        "validation": 10,
        "test": 10,
    }
    val = (tmp_path / "out" / "validation.names.txt").read_text().splitlines()
    assert val[0] == "zero/spk1_nohash_1.wav" and all("spk1" in n for n in val)
    assert np.array_equal(
        np.load(tmp_path / "out" / "train.labels.npy"), np.repeat(np.arange(10), 1)
    )
    assert m["classes"] == list(P.DIGITS)


def test_corrupt_file_error_skip_and_atomic_replace(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _sc09_tree(src)
    first = P.prepare("sc09", src, out, progress=False)
    (src / "three" / "spk0_nohash_0.wav").write_bytes(b"RIFF not really a wav")
    with pytest.raises(UserError, match=r"three/spk0_nohash_0\.wav"):
        P.prepare("sc09", src, out, progress=False)
    assert _manifest(out) == first  # the old prepared folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp folder left
    m = P.prepare("sc09", src, out, skip_bad=True, progress=False)
    assert m["splits"]["train"]["clips"] == 9
    assert [s["file"] for s in m["skipped"]] == ["three/spk0_nohash_0.wav"]
    assert "three/spk0_nohash_0.wav" in m["skipped"][0]["error"]
    assert m["inputs_sha256"] != first["inputs_sha256"]


def test_inputs_sha256_tracks_content(tmp_path):
    src = tmp_path / "src"
    for i in range(5):
        _wav(src / f"{i}.wav", seed=i)
    a = P.prepare("folder", src, tmp_path / "a", progress=False)["inputs_sha256"]
    assert P.prepare("folder", src, tmp_path / "b", progress=False)["inputs_sha256"] == a
    _wav(src / "3.wav", seed=99)
    assert P.prepare("folder", src, tmp_path / "c", progress=False)["inputs_sha256"] != a


def test_percentage_split_matches_paper():
    assert P.percentage_split(241, 0.88) == (212, 226)  # YouTubeMix 212 / 14 / 15
    assert P.percentage_split(4328, 0.88) == (
        3808,
        4068,
    )  # Beethoven 0-3807 / 3808-4067 / 4068-4327


def test_beethoven_and_youtubemix_plans(tmp_path, capsys):
    b = tmp_path / "beethoven"
    b.mkdir()
    for i in range(4328):
        (b / f"{i}.wav").touch()
    plan = P.plan_beethoven(tmp_path)
    assert [len(plan.splits[s]) for s in P.SPLITS] == [3808, 260, 260]
    assert plan.splits["train"][10].name == "10.wav" and plan.splits["test"][0].name == "4068.wav"
    assert plan.splits["test"][-1].name == "4327.wav"
    y = tmp_path / "ytm"
    y.mkdir()
    for i in range(241):
        (y / f"out{i:03d}.wav").touch()
    plan = P.plan_youtubemix(y)
    assert [len(plan.splits[s]) for s in P.SPLITS] == [212, 14, 15]
    assert plan.splits["validation"][0].name == "out212.wav"
    (y / "out240.wav").unlink()
    P.plan_youtubemix(y)
    assert "240 files" in capsys.readouterr().err


def test_folder_resamples_and_downmixes(tmp_path):
    src = tmp_path / "music"
    for i in range(18):
        _wav(src / "a" / f"take{i}.wav", n=4410, sr=44100, channels=2, seed=i)
    _wav(src / "b" / "x.flac", n=8000, sr=8000, seed=1)
    x = _wav(src / "b" / "y.ogg", n=16000, sr=16000, seed=2, fmt="OGG")
    (src / "notes.txt").write_text("not audio")
    m = P.prepare("folder", src, tmp_path / "out", progress=False)
    assert sum(m["splits"][s]["clips"] for s in P.SPLITS) == 20
    assert [m["splits"][s]["clips"] for s in P.SPLITS] == [18, 1, 1]
    names = (tmp_path / "out" / "train.names.txt").read_text().splitlines()
    assert names[:3] == ["a/take0.wav", "a/take1.wav", "a/take2.wav"]  # natural order
    lengths = np.diff(np.load(tmp_path / "out" / "train.offsets.npy"))
    assert lengths[0] == 1600  # 0.1 s at 44.1 kHz -> 1600 samples at 16 kHz
    assert (
        np.diff(np.load(tmp_path / "out" / "validation.offsets.npy"))[0] == 16000
    )  # 8 kHz flac doubled
    assert np.diff(np.load(tmp_path / "out" / "test.offsets.npy"))[0] == len(x)
    assert (np.load(tmp_path / "out" / "train.labels.npy") == -1).all()


def test_fsdd_subset(shared_data_dir, tmp_path):
    src = shared_data_dir / "fsdd" / "recordings"
    if not src.is_dir():
        pytest.skip(f"{src} missing")
    rec = tmp_path / "fsdd" / "recordings"
    rec.mkdir(parents=True)
    for digit in (3, 7):
        for take in (0, 4, 5, 9, 10, 49):
            shutil.copy(src / f"{digit}_george_{take}.wav", rec)
    m = P.prepare("fsdd", tmp_path / "fsdd", tmp_path / "out", progress=False)
    assert [m["splits"][s]["clips"] for s in P.SPLITS] == [4, 4, 4]
    assert sorted(np.load(tmp_path / "out" / "test.labels.npy").tolist()) == [3, 3, 7, 7]
    info = sf.info(rec / "3_george_10.wav")
    assert info.samplerate == 8000
    names = (tmp_path / "out" / "train.names.txt").read_text().splitlines()
    i = names.index("3_george_10.wav")
    assert np.diff(np.load(tmp_path / "out" / "train.offsets.npy"))[i] == 2 * info.frames


def test_synthetic_through_cli(tmp_path):
    from sashimi.cli import main

    out = tmp_path / "digits"
    assert (
        main(
            [
                "prepare",
                "--dataset",
                "synth-digits",
                "--n-clips",
                "20",
                "--seed",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    m = _manifest(out)
    assert [m["splits"][s]["clips"] for s in P.SPLITS] == [16, 2, 2]
    assert m["options"] == {"n_clips": 20, "seed": 3}
    assert np.load(out / "train.labels.npy").tolist() == [i % 10 for i in range(16)]
    out2 = tmp_path / "digits2"
    assert (
        main(
            [
                "prepare",
                "--dataset",
                "synth-digits",
                "--n-clips",
                "20",
                "--seed",
                "3",
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    assert _manifest(out2)["inputs_sha256"] == m["inputs_sha256"]
    assert np.array_equal(np.load(out / "test.audio.npy"), np.load(out2 / "test.audio.npy"))
    assert (
        main(
            [
                "prepare",
                "--dataset",
                "synth-piano",
                "--n-clips",
                "3",
                "--seconds",
                "0.5",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    assert _manifest(tmp_path / "p")["splits"]["train"] == {"clips": 2, "samples": 16000}


def test_prepare_by_params_key(tmp_path, monkeypatch, capsys):
    """`--key` prepares a dataset exactly as params.yaml describes it; its options are not flags."""
    import yaml

    from sashimi.cli import main

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["datasets"]["sc09"]["demo"]["options"]["n_clips"] = 10
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    monkeypatch.delenv("SASHIMI_SCALE", raising=False)
    out = tmp_path / "sc09"
    assert main(["--params", str(params), "prepare", "--key", "sc09", "--out", str(out)]) == 0
    m = _manifest(out)
    assert m["dataset"] == "sc09" and m["format"] in P.DATASETS
    assert sum(s["clips"] for s in m["splits"].values()) == 10
    argv = ["--params", str(params), "prepare", "--key", "sc09", "--n-clips", "5"]
    assert main([*argv, "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: --n-clips: with --key set datasets.sc09.options.n_clips in {params}"
    assert not (tmp_path / "again").exists()
    assert main(["--params", str(params), "prepare", "--key", "no-such-dataset"]) == 2


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="source folder not found"):
        P.prepare("sc09", tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no Speech Commands layout"):
        P.prepare("sc09", tmp_path / "empty", tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="no audio files"):
        P.prepare("folder", tmp_path / "empty", tmp_path / "out", progress=False)
    bad = tmp_path / "fsdd" / "recordings"
    _wav(bad / "3_george_1.wav")
    _wav(bad / "george.wav")
    with pytest.raises(UserError, match="george.wav: not an FSDD file name"):
        P.prepare("fsdd", tmp_path / "fsdd", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- hosted archives


def _music_zip(path: Path, top: str, names: list[str], *, extra: dict[str, bytes] | None = None):
    """A zip laid out like the authors' archives: clip k of `names` holds the constant (k+1)/512."""
    with zipfile.ZipFile(path, "w") as zf:
        for k, name in enumerate(names):
            buf = io.BytesIO()
            sf.write(buf, np.full(32, (k + 1) / 512, np.float32), SR, format="WAV")
            zf.writestr(top + name, buf.getvalue())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)


@contextlib.contextmanager
def _serve(folder: Path):
    """A plain HTTP server on 127.0.0.1 serving `folder`."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _official_split(names: list[str], train: float = 0.88) -> dict[str, list[str]]:
    """The official loader's rule: natural sort, then [0, a) / [a, b) / [b, n) by ratio."""
    files = sorted(names, key=lambda s: int(re.sub(r"\D", "", s)))
    n = len(files)
    a, b = int(train * n), int((train + (1 - train) / 2) * n)
    return {"train": files[:a], "validation": files[a:b], "test": files[b:]}


def _check_prepared(out: Path, names: list[str], counts: dict[str, int]) -> None:
    """Split names as the official loader makes them, with each clip's own audio."""
    expect = _official_split(names)
    assert {s: len(v) for s, v in expect.items()} == counts
    for split in P.SPLITS:
        assert (out / f"{split}.names.txt").read_text().splitlines() == expect[split]
        audio = np.load(out / f"{split}.audio.npy")
        offsets = np.load(out / f"{split}.offsets.npy")
        for j, name in enumerate(expect[split]):
            clip = audio[offsets[j] : offsets[j + 1]]
            assert np.array_equal(clip, np.full(32, (names.index(name) + 1) / 512, np.float32))


YTM = [f"out{i:03d}.wav" for i in range(241)]


@pytest.mark.parametrize("layout", ["official", "with-macos-forks", "with-readme", "no-top-folder"])
def test_youtubemix_archive_layouts_download_and_prepare(tmp_path, monkeypatch, layout):
    hosted = tmp_path / "hosted"
    hosted.mkdir()
    top = "" if layout == "no-top-folder" else "youtube_mix/"
    extra = {
        "with-macos-forks": {f"__MACOSX/youtube_mix/._{n}": b"\0\5\26\7" for n in YTM[:3]},
        "with-readme": {"README.md": b"YouTubeMix"},
    }.get(layout)
    _music_zip(hosted / "youtube_mix.zip", top, YTM[::-1], extra=extra)  # archive order: any
    raw = tmp_path / "data" / "raw" / "youtubemix"
    with _serve(hosted) as base:
        monkeypatch.setenv("SASHIMI_DOWNLOAD_BASE_URL", base)
        D.download("youtubemix", raw, progress=False)
    m = P.prepare("youtubemix", raw, tmp_path / "prepared", progress=False)
    assert Path(m["source"]).name == ("youtube_mix" if layout == "with-readme" else "youtubemix")
    names = YTM[::-1]
    _check_prepared(tmp_path / "prepared", names, {"train": 212, "validation": 14, "test": 15})


def test_beethoven_archive_downloads_and_splits_in_natural_order(tmp_path, monkeypatch, capsys):
    hosted = tmp_path / "hosted"
    hosted.mkdir()
    names = [f"{i}.wav" for i in range(50)]  # 10.wav sorts before 2.wav as text, not here
    _music_zip(hosted / "beethoven.zip", "beethoven/", sorted(names))
    raw = tmp_path / "raw" / "beethoven"
    with _serve(hosted) as base:
        monkeypatch.setenv("SASHIMI_DOWNLOAD_BASE_URL", base)
        D.download("beethoven", raw, progress=False)
    m = P.prepare("beethoven", raw, tmp_path / "prepared", progress=False)
    assert "50 files, Beethoven has 4328" in capsys.readouterr().err
    assert m["splits"]["test"]["clips"] == 3
    _check_prepared(tmp_path / "prepared", sorted(names), {"train": 44, "validation": 3, "test": 3})


def test_official_data_folder_unzipped_by_hand(tmp_path):
    """The authors' README: unzip each `<dataset>.zip` inside one `data/` folder."""
    data = tmp_path / "data"
    for archive, top, names in (("b.zip", "beethoven/", [f"{i}.wav" for i in range(30)]),
                                ("y.zip", "youtube_mix/", YTM[:30])):  # fmt: skip
        _music_zip(tmp_path / archive, top, names)
        with zipfile.ZipFile(tmp_path / archive) as zf:
            zf.extractall(data)
    b = P.prepare("beethoven", data, tmp_path / "b", progress=False)
    y = P.prepare("youtubemix", data, tmp_path / "y", progress=False)
    assert Path(b["source"]) == data / "beethoven" and Path(y["source"]) == data / "youtube_mix"
    assert b["splits"]["train"]["clips"] == y["splits"]["train"]["clips"] == 26
