"""`sashimi prepare --dataset NAME --source DIR --out DIR`: split, resample, store as memmaps.

Output (contracts, "Data"): per split `<split>.audio.npy` (float32 16 kHz mono, clips
concatenated), `<split>.offsets.npy`, `<split>.labels.npy`, `<split>.names.txt`, plus
`manifest.json`. Everything is written into a temp folder beside `--out` and renamed over
it at the end: an existing prepared folder is replaced only on success.

Decoding runs in a thread pool (soundfile and torch release the GIL) with a bounded
window of clips in flight; clips are written to disk in order as they arrive, so memory
stays flat for any dataset size.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import os
import re
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sashimi.errors import UserError
from sashimi.io import SAMPLE_RATE, read_audio, recover_dir, replace_dir, write_json

SPLITS = ("train", "validation", "test")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif"}
# Digit clips per split (train, validation, test) of the two Speech Commands releases.
KNOWN_SC09_COUNTS = {
    (31158, 3643, 4107): "Speech Commands v0.02",
    (18620, 2494, 2552): "Speech Commands v0.01",
}
BEETHOVEN_FILES = 4328
YOUTUBEMIX_FILES = 241


@dataclass
class Item:
    """One input clip: a file (path) or a synthetic clip (index), with its stored name and label."""

    name: str
    path: Path | None = None
    index: int = -1
    label: int = -1


@dataclass
class Plan:
    """What to prepare: items per split, extra files that shape the result (split lists), labels."""

    splits: dict[str, list[Item]]
    root: Path | None = None
    extra_files: list[Path] = field(default_factory=list)
    classes: list[str] | None = None
    options: dict = field(default_factory=dict)
    load: Callable[[Item], np.ndarray] | None = None  # synthetic: item -> audio; None = read files


# ----------------------------------------------------------------------------- splitting rules


def natural_key(s: str) -> list:
    """'out10.wav' after 'out9.wav': digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def percentage_split(n: int, train: float) -> tuple[int, int]:
    """The paper code's index split: train [0, a), validation [a, b), test [b, n).

    a = int(train * n), b = int((train + (1 - train) / 2) * n); e.g. 241 -> 212 / 14 / 15,
    4328 -> 3808 / 260 / 260 (the Beethoven split) for train = 0.88.
    """
    return int(train * n), int((train + (1 - train) / 2) * n)


def _split_by_index(items: list[Item], train: float) -> dict[str, list[Item]]:
    a, b = percentage_split(len(items), train)
    return {"train": items[:a], "validation": items[a:b], "test": items[b:]}


def _find_root(source: Path, ok: Callable[[Path], bool], what: str, depth: int = 3) -> Path:
    """`source` or the shallowest folder below it (breadth first, `depth` levels) where ok(folder)."""
    if not source.is_dir():
        raise UserError(f"{source}: source folder not found (run `sashimi download` first?)")
    level = [source]
    for _ in range(depth + 1):
        for d in level:
            if ok(d):
                return d
        level = sorted(
            (c for d in level for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")),
            key=lambda p: natural_key(p.name),
        )
    raise UserError(f"{source}: no {what} found")


def _audio_files(folder: Path, recursive: bool = False) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    files = [p for p in it if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()]
    return [
        p for p in files if not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def plan_sc09(source: Path) -> Plan:
    """Speech Commands layout {zero..nine}/*.wav + validation_list.txt / testing_list.txt (v0.01 or v0.02)."""
    root = _find_root(
        source,
        lambda d: (d / "zero").is_dir() and (d / "nine").is_dir(),
        "Speech Commands layout (zero/ ... nine/)",
    )
    lists = {}
    for split, fname in (("validation", "validation_list.txt"), ("test", "testing_list.txt")):
        p = root / fname
        if not p.is_file():
            raise UserError(f"{p}: missing (the official split list of Speech Commands)")
        lists[split] = {
            line.strip().replace("\\", "/") for line in p.read_text().splitlines() if line.strip()
        }
    splits: dict[str, list[Item]] = {s: [] for s in SPLITS}
    for label, word in enumerate(DIGITS):
        d = root / word
        if not d.is_dir():
            raise UserError(f"{d}: missing digit folder")
        for p in sorted(_audio_files(d), key=lambda p: natural_key(p.name)):
            name = f"{word}/{p.name}"
            split = (
                "validation"
                if name in lists["validation"]
                else "test"
                if name in lists["test"]
                else "train"
            )
            splits[split].append(Item(name, p, label=label))
    counts = tuple(len(splits[s]) for s in SPLITS)
    if counts in KNOWN_SC09_COUNTS:
        print(f"{root}: digit counts {counts} match {KNOWN_SC09_COUNTS[counts]}")
    return Plan(
        splits, root, [root / "validation_list.txt", root / "testing_list.txt"], list(DIGITS)
    )


def plan_beethoven(source: Path) -> Plan:
    """Files 0.wav .. 4327.wav, natural sort, paper split 88/6/6 (3808 / 260 / 260).

    The folder holding 0.wav is found up to 3 levels down: `beethoven.zip` unzips to
    `beethoven/`, the folder the official config names.
    """
    root = _find_root(source, lambda d: (d / "0.wav").is_file(), "Beethoven clips (0.wav ...)")
    files = sorted(_audio_files(root), key=lambda p: natural_key(p.name))
    if len(files) != BEETHOVEN_FILES:
        _warn(
            f"{root}: {len(files)} files, Beethoven has {BEETHOVEN_FILES}; applying the same 88/6/6 index split"
        )
    return Plan(_split_by_index([Item(p.name, p) for p in files], 0.88), root)


def plan_youtubemix(source: Path) -> Plan:
    """Files out000.wav .. out240.wav, natural sort, first 88% train / 6% validation / rest test.

    The folder holding out000.wav is found up to 3 levels down: `youtube_mix.zip` unzips to
    `youtube_mix/`, the folder the official config names.
    """
    root = _find_root(
        source, lambda d: (d / "out000.wav").is_file(), "YouTubeMix clips (out000.wav ...)"
    )
    files = sorted(_audio_files(root), key=lambda p: natural_key(p.name))
    if len(files) != YOUTUBEMIX_FILES:
        _warn(
            f"{root}: {len(files)} files, YouTubeMix has {YOUTUBEMIX_FILES}; applying the same 88/6/6 index split"
        )
    return Plan(_split_by_index([Item(p.name, p) for p in files], 0.88), root)


_FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")


def plan_fsdd(source: Path) -> Plan:
    """FSDD recordings/{digit}_{speaker}_{take}.wav: test takes 0-4, validation 5-9, train 10-49."""
    root = _find_root(
        source,
        lambda d: d.name == "recordings" and any(_FSDD_NAME.match(p.name) for p in d.iterdir()),
        "FSDD recordings/ folder",
    )
    splits: dict[str, list[Item]] = {s: [] for s in SPLITS}
    for p in sorted(_audio_files(root), key=lambda p: natural_key(p.name)):
        m = _FSDD_NAME.match(p.name)
        if m is None:
            raise UserError(f"{p}: not an FSDD file name ({{digit}}_{{speaker}}_{{take}}.wav)")
        take = int(m.group(3))
        split = "test" if take < 5 else "validation" if take < 10 else "train"
        splits[split].append(Item(p.name, p, label=int(m.group(1))))
    return Plan(splits, root, classes=[str(d) for d in range(10)])


def plan_folder(source: Path) -> Plan:
    """Any folder of audio (wav/flac/ogg/mp3/aiff, recursive), natural sort, 90/5/5 split."""
    if not source.is_dir():
        raise UserError(f"{source}: source folder not found")
    files = sorted(
        _audio_files(source, recursive=True),
        key=lambda p: natural_key(p.relative_to(source).as_posix()),
    )
    if not files:
        raise UserError(f"{source}: no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))})")
    if len(files) < 20:
        a, b = percentage_split(len(files), 0.9)
        _warn(
            f"{source}: only {len(files)} files; 90/5/5 by index gives {a}/{b - a}/{len(files) - b}"
        )
    splits = _split_by_index([Item(p.relative_to(source).as_posix(), p) for p in files], 0.9)
    if not splits["train"]:  # 1 file: int(0.9) = 0; keep it for training rather than testing
        splits["train"], splits["test"] = splits["test"], []
    return Plan(splits, source)


def plan_synth_digits(n_clips: int, seed: int) -> Plan:
    from sashimi.data.synthetic import digit_clip

    items = [Item(f"synth-digits/{i:06d}", index=i, label=i % 10) for i in range(n_clips)]
    a, b = int(0.8 * n_clips), int(0.9 * n_clips)
    return Plan(
        {"train": items[:a], "validation": items[a:b], "test": items[b:]},
        classes=[str(d) for d in range(10)],
        options={"n_clips": n_clips, "seed": seed},
        load=lambda it: digit_clip(it.index, seed)[0],
    )


def plan_synth_piano(n_clips: int, seed: int, seconds: float) -> Plan:
    from sashimi.data.synthetic import piano_clip

    items = [Item(f"synth-piano/{i:06d}", index=i) for i in range(n_clips)]
    a, b = int(0.8 * n_clips), int(0.9 * n_clips)
    return Plan(
        {"train": items[:a], "validation": items[a:b], "test": items[b:]},
        options={"n_clips": n_clips, "seed": seed, "seconds": seconds},
        load=lambda it: piano_clip(it.index, seconds, seed),
    )


FILE_DATASETS: dict[str, Callable[[Path], Plan]] = {
    "sc09": plan_sc09,
    "speech-commands-v1": plan_sc09,
    "speech-commands-v2": plan_sc09,
    "beethoven": plan_beethoven,
    "youtubemix": plan_youtubemix,
    "fsdd": plan_fsdd,
    "folder": plan_folder,
}
SYNTHETIC = {"synth-digits": (2000, None), "synth-piano": (64, 8.0)}  # default n_clips, seconds
DATASETS = (*FILE_DATASETS, *SYNTHETIC)


# ----------------------------------------------------------------------------- decoding


def load_file(path: Path, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, str, int]:
    """Read, mono-average, resample to `sample_rate`, clip to [-1, 1]. Returns (audio, sha256, bytes)."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    audio, sr = read_audio(path)  # the bytes are in the page cache now: no second disk read
    if not np.isfinite(audio).all():
        raise UserError(f"{path}: audio contains NaN or infinite samples")
    if sr != sample_rate:
        audio = resample(audio, sr, sample_rate)
    return np.clip(audio, -1.0, 1.0), digest, len(data)


def resample(audio: np.ndarray, sr: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited sinc resampling (torchaudio.functional.resample), float32 (L,) -> (L',)."""
    import torch
    import torchaudio.functional as AF

    x = torch.from_numpy(audio)[None]  # (1, L)
    with torch.no_grad():
        y = AF.resample(x, sr, sample_rate)  # (1, L')
    return y[0].numpy()


def _ordered_map(
    fn: Callable, items: Iterable, workers: int, window: int
) -> Iterator[tuple[object, Future]]:
    """Like executor.map but yields (item, future) in order with at most `window` in flight."""
    ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prepare")
    try:
        it = iter(items)
        pending: deque = deque((item, ex.submit(fn, item)) for item in itertools.islice(it, window))
        while pending:
            item, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, ex.submit(fn, nxt)))
            yield item, fut
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- writing


class SplitWriter:
    """Streams clips of one split to `<split>.audio.npy` (header patched at the end) + side files."""

    HEADER = 128  # bytes of a version-1.0 .npy header for any 1-D float32 shape

    def __init__(self, folder: Path, split: str):
        self.folder, self.split = folder, split
        self.f = open(folder / f"{split}.audio.npy", "wb")
        self.f.write(b"\0" * self.HEADER)
        self.offsets, self.labels, self.names = [0], [], []

    def add(self, audio: np.ndarray, name: str, label: int) -> None:
        audio = np.ascontiguousarray(audio, dtype="<f4")  # (L,)
        self.f.write(audio.tobytes())
        self.offsets.append(self.offsets[-1] + len(audio))
        self.labels.append(label)
        self.names.append(name)

    def close(self) -> dict:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "<f4", "fortran_order": False, "shape": (self.offsets[-1],)}
        )
        # Always 128 bytes for a 1-D shape; checked anyway so that a bad file is never written.
        if len(header.getvalue()) != self.HEADER:
            raise RuntimeError(f"unexpected .npy header length {len(header.getvalue())}")
        self.f.seek(0)
        self.f.write(header.getvalue())
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        np.save(self.folder / f"{self.split}.offsets.npy", np.array(self.offsets, dtype=np.int64))
        np.save(self.folder / f"{self.split}.labels.npy", np.array(self.labels, dtype=np.int64))
        (self.folder / f"{self.split}.names.txt").write_text("".join(n + "\n" for n in self.names))
        return {"clips": len(self.names), "samples": int(self.offsets[-1])}

    def abort(self) -> None:
        self.f.close()


def prepare(
    dataset: str,
    source: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    skip_bad: bool = False,
    workers: int | None = None,
    n_clips: int | None = None,
    seed: int = 0,
    seconds: float | None = None,
    sample_rate: int = SAMPLE_RATE,
    key: str | None = None,
    progress: bool = True,
) -> dict:
    """Prepare format `dataset` from `source` into `out` (atomic replace). Returns the manifest.

    `key` is the params.yaml dataset key recorded in the manifest (default: the format).
    """
    if dataset in SYNTHETIC and sample_rate != SAMPLE_RATE:
        raise UserError(f"{dataset} is generated at {SAMPLE_RATE} Hz, not {sample_rate}")
    if dataset in SYNTHETIC:
        default_n, default_s = SYNTHETIC[dataset]
        n = default_n if n_clips is None else int(n_clips)
        if n < 1:
            raise UserError(f"--n-clips must be at least 1, got {n}")
        if dataset == "synth-digits":
            plan = plan_synth_digits(n, seed)
        else:
            plan = plan_synth_piano(n, seed, float(seconds or default_s))
    elif dataset in FILE_DATASETS:
        if source is None:
            raise UserError(f"prepare --dataset {dataset} needs --source DIR")
        plan = FILE_DATASETS[dataset](Path(source))
    else:
        raise UserError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        n_workers = workers or min(8, os.cpu_count() or 1)
        manifest = _write(plan, dataset, tmp, skip_bad, n_workers, sample_rate, progress)
        manifest = {"dataset": key or dataset, "format": dataset, **manifest}
        write_json(tmp / "manifest.json", manifest)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write(
    plan: Plan,
    dataset: str,
    folder: Path,
    skip_bad: bool,
    workers: int,
    sample_rate: int,
    progress: bool,
) -> dict:
    """Load every planned clip (in parallel, in order) into the split shards in `folder`;
    returns the manifest's body. A bad file stops the run, or is skipped with `skip_bad`."""
    from tqdm import tqdm

    load = _loader(plan, sample_rate)
    todo = [(split, item) for split in SPLITS for item in plan.splits[split]]
    writers = {s: SplitWriter(folder, s) for s in SPLITS}
    digests: dict[str, tuple[str, int]] = {}
    skipped: list[dict] = []
    t0 = time.perf_counter()
    try:
        bar = tqdm(
            total=len(todo),
            desc=f"prepare {dataset}",
            unit="clip",
            disable=not progress,
            mininterval=1.0,
        )
        stream = contextlib.closing(
            _ordered_map(lambda si: load(si[1]), todo, workers, window=4 * workers)
        )
        with stream as results, bar:
            for (split, item), fut in results:
                try:
                    audio, digest, nbytes = fut.result()
                except UserError as e:
                    if not skip_bad:
                        raise
                    skipped.append({"file": item.name, "split": split, "error": str(e)})
                    _warn(f"skipped {e}")
                    bar.update(1)
                    continue
                if len(audio) == 0:
                    raise UserError(f"{item.path or item.name}: no samples after resampling")
                writers[split].add(audio, item.name, item.label)
                if digest is not None:
                    digests[item.name] = (digest, nbytes)
                bar.update(1)
        splits = {s: w.close() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    elapsed = time.perf_counter() - t0
    inputs_sha256 = _inputs_sha256(plan, dataset, sample_rate, todo, digests, skipped)
    print(f"prepared {dataset}: " + ", ".join(f"{s} {v['clips']} clips" for s, v in splits.items())
          + f" ({len(todo) / max(elapsed, 1e-9):.0f} clips/s)")  # fmt: skip
    return {
        "source": str(plan.root) if plan.root is not None else "synthetic",
        "sample_rate": sample_rate,
        "splits": splits,
        "inputs_sha256": inputs_sha256,
        "skipped": skipped,
        "classes": plan.classes,
        "options": plan.options,
    }


def _loader(plan: Plan, sample_rate: int):
    """item -> (audio (L,) float32, sha256 of the input or None, input bytes)."""
    if plan.load is not None:  # synthetic: the "input" is the generated clip itself

        def load(item: Item):
            audio = np.ascontiguousarray(plan.load(item), dtype="<f4")  # (L,)
            return audio, hashlib.sha256(audio.tobytes()).hexdigest(), audio.nbytes
    else:

        def load(item: Item):
            try:
                return load_file(item.path, sample_rate)
            except UserError:
                raise
            except Exception as e:  # a decoder or resampler failure still names the file
                raise UserError(
                    f"{item.path}: cannot read audio ({type(e).__name__}: {e})"
                ) from None

    return load


def _inputs_sha256(plan, dataset, sample_rate, todo, digests, skipped) -> str:
    """One hash of everything the shards were made from: settings, every input file's
    digest in plan order, the extra files and the skipped names."""
    options = sorted(plan.options.items())
    h = hashlib.sha256(f"sashimi-prepare\0{dataset}\0{sample_rate}\0{options}\n".encode())
    for _, item in todo:
        if item.name in digests:
            d, nbytes = digests[item.name]
            h.update(f"{item.name}\0{nbytes}\0{d}\n".encode())
    for p in plan.extra_files:
        h.update(f"{p.name}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    for s in skipped:
        h.update(f"skipped\0{s['file']}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- CLI


def configure_parser(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--key", help="a dataset of params.yaml: its format, folders and options")
    what.add_argument(
        "--dataset", choices=DATASETS, help="the source's layout (or a synthetic set)"
    )
    p.add_argument("--source", default=None, help="raw folder (default data/raw/<dataset>)")
    p.add_argument("--out", default=None, help="prepared folder (default data/prepared/<dataset>)")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable audio (listed in manifest.json)"
    )
    p.add_argument(
        "--workers", type=int, default=None, help="decoding threads (default min(8, CPUs))"
    )
    p.add_argument(
        "--n-clips", type=int, default=None, help="--dataset synth-*: clips (digits 2000, piano 64)"
    )
    p.add_argument("--seed", type=int, default=None, help="--dataset synth-*: seed (default 0)")
    p.add_argument("--seconds", type=float, default=None, help="--dataset synth-piano: clip s (8)")


OPTION_KEYS = {"n_clips", "seed", "seconds"}


def run(args: argparse.Namespace) -> int:
    kwargs = {"n_clips": args.n_clips, "seed": args.seed, "seconds": args.seconds}
    if args.key:
        from sashimi.config import load_params

        P = load_params(args.params, check_models=False)  # only the datasets section is needed
        ds = P.dataset(args.key)
        unknown = set(ds.options) - OPTION_KEYS
        if unknown:
            raise UserError(
                f"{P.path}: datasets.{ds.key}.options.{sorted(unknown)[0]}: unknown option"
            )
        given = sorted(k for k, v in kwargs.items() if v is not None)
        if given:  # a params dataset is configured in params.yaml only
            flag = "--" + given[0].replace("_", "-")
            raise UserError(
                f"{flag}: with --key set datasets.{ds.key}.options.{given[0]} in {P.path}"
            )
        kwargs.update(ds.options)
        fmt, key, sr = ds.format, ds.key, ds.sample_rate
        source = args.source or (ds.raw_dir if fmt in FILE_DATASETS else None)
        out = args.out or ds.prepared_dir
    else:
        fmt = key = args.dataset
        sr = SAMPLE_RATE
        source = args.source or (Path("data/raw") / fmt if fmt in FILE_DATASETS else None)
        out = args.out or Path("data/prepared") / fmt
    kwargs["seed"] = kwargs["seed"] if kwargs["seed"] is not None else 0
    prepare(
        fmt,
        source,
        out,
        skip_bad=args.skip_bad,
        workers=args.workers,
        sample_rate=sr,
        key=key,
        **kwargs,
    )
    return 0
