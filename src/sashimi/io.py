"""Atomic file and folder writes, and audio I/O (soundfile; never torchaudio.load/save)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from sashimi.errors import UserError

SAMPLE_RATE = 16000  # every clip, real or generated, is 16 kHz (SPEC: datasets are resampled)

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write to a temp file beside `path`, fsync, then rename over it.

    A crash leaves either the old file or the new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read any soundfile-readable audio; return (float32 mono (L,), sample rate)."""
    import soundfile as sf

    path = Path(path)
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise UserError(f"{path}: cannot read audio ({str(e).splitlines()[0]})") from None
    if audio.shape[0] == 0:
        raise UserError(f"{path}: audio file has no samples")
    return audio.mean(axis=1).astype(np.float32), int(sr)  # (L, C) -> (L,)


def write_wav(path: str | os.PathLike, audio: np.ndarray, sr: int = SAMPLE_RATE) -> None:
    """Write float audio in [-1, 1] as 16-bit PCM wav, atomically."""
    import soundfile as sf

    audio = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    with atomic_write(path, "wb") as f:
        sf.write(f, audio, sr, format="WAV", subtype="PCM_16")


def replace_dir(new: Path, target: Path) -> None:
    """Put folder `new` at `target`, replacing an existing one only at the last moment.

    Two renames on one file system. A crash between them leaves the old folder at
    `.<name>.old-*` beside the target; `recover_dir(target)` (run first by download and
    prepare) moves it back. One writer per target folder at a time.
    """
    target = Path(target)
    old = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.rmdir(old)
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(target: Path) -> None:
    """Clean up after an interrupted replace_dir: restore `.old-*` if the target is gone,
    delete leftover `.tmp-*` / `.old-*` folders otherwise."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for p in sorted(target.parent.glob(f".{target.name}.old-*")):
        if p.is_dir() and not target.exists():
            os.rename(p, target)
        else:
            shutil.rmtree(p, ignore_errors=True)
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
