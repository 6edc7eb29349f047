"""`sashimi download --dataset NAME [--out DIR]`: fetch and unpack a dataset archive.

Resumable (HTTP Range on `<archive>.part`), verified (size and sha256 where known),
atomic (the archive is renamed into place only once verified; it is extracted into a
temp folder beside the target that is renamed over it), and safe (members that would
land outside the target are refused, for tar and zip alike). Standard library only.

Archives are kept in `<out>/../.archives/` until extraction succeeds (then deleted unless
`--keep-archive`). `SASHIMI_DOWNLOAD_BASE_URL` points every dataset at a mirror
(`<base>/<archive file name>`), e.g. a local server in tests. `--dataset release-*`
fetches the authors' release files instead (sashimi.data.release).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sashimi.errors import UserError

HF = "https://huggingface.co/datasets/krandiash"


@dataclass(frozen=True)
class Source:
    """One downloadable archive. `size`/`sha256` are None where not known in advance."""

    url: str
    size: int | None = None
    sha256: str | None = None
    gated: bool = False  # Hugging Face gated dataset: needs a token with accepted terms
    note: str = ""

    @property
    def filename(self) -> str:
        return PurePosixPath(urllib.parse.urlparse(self.url).path).name


# Edit here (or pass --url / --sha256) if an archive moves. The authors' music archives
# unzip to the folders their dataset configs name (`beethoven/0.wav ...`,
# `youtube_mix/out000.wav ...`); a single top folder is flattened away on extraction.
# Their sizes and checksums are not published anywhere we could read: not recorded.
DATASETS: dict[str, Source] = {
    "beethoven": Source(f"{HF}/beethoven/resolve/main/beethoven.zip", gated=True),
    "youtubemix": Source(f"{HF}/youtubemix/resolve/main/youtube_mix.zip", gated=True),
    # Pinned revision; size and sha256 as recorded for that revision by another public
    # SC09 pipeline (not re-measured by us: pass --url .../resolve/main/sc09.zip to skip).
    "sc09": Source(
        f"{HF}/sc09/resolve/fe62f33d2af5db6f01e504ec1f360da7df9692e8/sc09.zip",
        size=893_855_183,
        sha256="ca0cff7168708fe3e1d2d6fd8ac7b0c26e4c574143ea708951e19ed6a58f7792",
    ),
    # Speech Commands: sha256 as published by torchaudio and TensorFlow Datasets.
    "speech-commands-v2": Source(
        "https://storage.googleapis.com/download.tensorflow.org/data/speech_commands_v0.02.tar.gz",
        size=2_428_923_189,
        sha256="af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58",
    ),
    "speech-commands-v1": Source(
        "https://storage.googleapis.com/download.tensorflow.org/data/speech_commands_v0.01.tar.gz",
        size=1_489_096_277,
        sha256="743935421bb51cccdb6bdd152e04c5c70274e935c82119ad7faeec31780d811d",
    ),
    # GitHub builds tag archives on the fly: no stable checksum.
    "fsdd": Source(
        "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/v1.0.10.zip"
    ),
}

MARKER = ".sashimi-download.json"  # written into the extracted folder last-before-rename
CHUNK = 1 << 20
BACKOFF_S = 1.0  # wait before retry k: BACKOFF_S * 2^(k-1) seconds, at most 30


# ----------------------------------------------------------------------------- helpers
def hf_token() -> str | None:
    """HF_TOKEN, else the token file of `huggingface-cli login` ($HF_HOME/token or ~/.cache/huggingface/token)."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var, "").strip():
            return os.environ[var].strip()
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    token_file = Path(os.environ.get("HF_TOKEN_PATH", home / "token"))
    with contextlib.suppress(OSError):
        token = token_file.read_text().strip()
        if token:
            return token
    return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


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


def _access_message(name: str, url: str, code: int) -> str:
    src = DATASETS.get(name)
    if src is not None and src.gated:
        have = "the token found was refused" if hf_token() else "no Hugging Face token found"
        return (
            f"{url}: HTTP {code} ({have}); accept the dataset terms on "
            f"https://huggingface.co/datasets/krandiash/{name} while logged in, then set "
            f"HF_TOKEN to a token of that account (or run `huggingface-cli login`)"
        )
    return (
        f"{url}: HTTP {code} access denied (pass a working --url, or set HF_TOKEN for Hugging Face)"
    )


# Worth retrying (the server was reached); anything else (DNS, refused, unreachable) is reported at once.
_TRANSIENT = (
    ConnectionResetError,
    ConnectionAbortedError,
    TimeoutError,
    http.client.RemoteDisconnected,
)
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


# ----------------------------------------------------------------------------- fetch
def fetch(
    url: str,
    dest: Path,
    *,
    size: int | None = None,
    sha256: str | None = None,
    token: str | None = None,
    name: str = "",
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download `url` to `dest` (resuming `dest.part`), verify size/sha256, rename into place.

    A connection that drops is retried `retries` times from where it stopped; when retries
    run out the partial file is kept and the next call resumes it. A wrong size or checksum
    removes the partial file and raises UserError.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        try:
            complete = _fetch_once(
                url, part, size=size, token=token, name=name, timeout=timeout, progress=progress
            )
        except _Interrupted as e:
            if attempt < retries:
                attempt += 1
                time.sleep(min(BACKOFF_S * 2 ** (attempt - 1), 30.0))
                continue
            raise UserError(
                f"{url}: download interrupted after {e.have:,} bytes ({e.reason}); run the same command again to resume"
            ) from None
        if complete:
            break
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise UserError(
            f"{url}: downloaded {got:,} bytes but expected {size:,}; removed the partial file"
        )
    if sha256 is not None:
        digest = sha256_file(part)
        if digest != sha256.lower():
            part.unlink()
            raise UserError(
                f"{url}: sha256 mismatch (got {digest}, expected {sha256}); removed the download"
            )
    os.replace(part, dest)
    return dest


class _Interrupted(Exception):
    def __init__(self, have: int, reason: str):
        self.have, self.reason = have, reason


def _fetch_once(
    url: str,
    part: Path,
    *,
    size: int | None,
    token: str | None,
    name: str,
    timeout: float,
    progress: bool,
) -> bool:
    """One HTTP request continuing `part`. True when the file is complete (per the server)."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if size is not None and have == size and part.exists():
        return True
    with _request(url, part, have, token=token, name=name, timeout=timeout) as resp:
        have, mode, total = _resume_point(resp, url, part, have, size)
        expected_total = total if total is not None else size
        bar = _progress_bar(part.name, expected_total, have, progress)
        try:
            written = _copy_body(resp, part, mode, have, bar)
        finally:
            bar.close()
    if expected_total is not None and written < expected_total:
        raise _Interrupted(written, f"connection closed at {written:,} of {expected_total:,} bytes")
    return True


def _request(url: str, part: Path, have: int, *, token: str | None, name: str, timeout: float):
    """Open `url` from byte `have`; HTTP and network errors become a UserError (permanent)
    or `_Interrupted` (worth a retry)."""
    req = urllib.request.Request(
        url, headers={"User-Agent": "sashimi-download/1.0", "Accept-Encoding": "identity"}
    )
    if token:  # unredirected: not forwarded to the CDN host the hub redirects to
        req.add_unredirected_header("Authorization", f"Bearer {token}")
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise UserError(_access_message(name, url, e.code)) from None
        if e.code == 416 and have:  # our partial file is at least as long as the server's file
            part.unlink()
            raise _Interrupted(
                0, "server refused the resume range; restarting from scratch"
            ) from None
        if e.code == 404:
            raise UserError(
                f"{url}: HTTP 404 not found (pass the right archive with --url)"
            ) from None
        if e.code >= 500:
            raise _Interrupted(have, f"HTTP {e.code}") from None
        raise UserError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, _TRANSIENT):
            raise _Interrupted(have, f"{type(reason).__name__}") from None
        raise UserError(
            f"cannot reach {url} ({reason}); check the network or pass another --url"
        ) from None


def _resume_point(resp, url: str, part: Path, have: int, size: int | None):
    """(bytes kept, file mode, server's total size or None) for this response: a 206 continues
    `part`, a 200 rewrites it; a mismatched range or size is refused."""
    status = resp.status
    length = resp.headers.get("Content-Length")
    length = int(length) if length is not None and length.isdigit() else None
    if have and status == 206:
        m = _CONTENT_RANGE.fullmatch((resp.headers.get("Content-Range") or "").strip())
        if m is None or int(m.group(1)) != have:
            # A range we did not ask for: start over rather than splice mismatched bytes.
            part.unlink()
            raise _Interrupted(
                0, f"bad Content-Range {resp.headers.get('Content-Range')!r}; restarting"
            )
        total = None if m.group(3) == "*" else int(m.group(3))
        mode = "ab"
    elif status == 200:
        have, mode = 0, "wb"  # server ignored Range (or fresh start): rewrite from byte 0
        total = length
    else:
        raise UserError(f"{url}: unexpected HTTP status {status}")
    if total is not None and size is not None and total != size:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise UserError(
            f"{url}: server file is {total:,} bytes but {size:,} were expected (wrong archive?)"
        )
    return have, mode, total


def _copy_body(resp, part: Path, mode: str, have: int, bar) -> int:
    """Stream the response into `part` (synced); a broken connection raises `_Interrupted`."""
    written = have
    with open(part, mode) as f:
        while True:
            try:
                block = resp.read(CHUNK)
            except (TimeoutError, http.client.IncompleteRead, ConnectionError, OSError) as e:
                f.flush()
                os.fsync(f.fileno())
                raise _Interrupted(written, type(e).__name__) from None
            if not block:
                break
            f.write(block)
            written += len(block)
            bar.update(len(block))
        f.flush()
        os.fsync(f.fileno())
    return written


def _progress_bar(desc: str, total: int | None, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        disable=not enabled,
        mininterval=1.0,
        leave=False,
    )


# ----------------------------------------------------------------------------- extract
def _safe_member(root: Path, name: str, archive: Path) -> Path:
    """Resolve member `name` under `root`; UserError if it is absolute or climbs out."""
    unsafe = f"{archive}: refusing unsafe archive member {name!r} (outside the target folder)"
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in p.parts:
        raise UserError(unsafe)
    dest = (root / p).resolve()
    if dest != root and root not in dest.parents:
        raise UserError(unsafe)
    return dest


def _check_link(root: Path, name: str, target: str, archive: Path) -> None:
    link_dir = (root / PurePosixPath(name)).parent
    dest = (link_dir / target).resolve() if not os.path.isabs(target) else Path(target).resolve()
    if dest != root and root not in dest.parents:
        raise UserError(
            f"{archive}: refusing archive link {name!r} -> {target!r} (points outside the target folder)"
        )


def extract(archive: Path, dest_dir: Path) -> None:
    """Extract a .zip / .tar(.gz|.bz2|.xz) into `dest_dir`, refusing unsafe members first."""
    try:
        _extract(Path(archive), Path(dest_dir).resolve())
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        raise UserError(
            f"{archive}: corrupt archive ({type(e).__name__}: {e}); delete it and download again"
        ) from None


def _extract(archive: Path, root: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            links = {}
            for info in infos:
                _safe_member(root, info.filename, archive)
                if stat.S_ISLNK(info.external_attr >> 16):
                    target = zf.read(info).decode("utf-8", "replace")
                    _check_link(root, info.filename, target, archive)
                    links[info.filename] = target
            for info in infos:
                if info.filename in links:
                    link = root / info.filename
                    link.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(links[info.filename], link)
                else:
                    zf.extract(info, root)
        return
    try:
        tf = tarfile.open(archive)
    except tarfile.TarError:
        raise UserError(f"{archive}: not a zip or tar archive") from None
    with tf:
        members = tf.getmembers()
        for m in members:
            _safe_member(root, m.name, archive)
            if m.issym():
                _check_link(root, m.name, m.linkname, archive)
            elif m.islnk():
                _safe_member(root, m.linkname, archive)
            elif not (m.isfile() or m.isdir()):
                raise UserError(f"{archive}: refusing special archive member {m.name!r}")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(root, members=members, **kwargs)


def _flatten_single_dir(folder: Path) -> Path:
    """An archive holding one top folder (`sc09/...`) -> that folder; else `folder` itself."""
    entries = [p for p in folder.iterdir() if p.name not in ("__MACOSX", MARKER)]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return folder


# ----------------------------------------------------------------------------- dataset
def resolve_source(name: str, url: str | None = None, sha256: str | None = None) -> Source:
    """The Source for `name`, with --url / --sha256 / SASHIMI_DOWNLOAD_BASE_URL applied.

    A custom --url drops the table's size and checksum (different file) unless --sha256 is
    given; a mirror base URL keeps them (same file, other host).
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    src = DATASETS[name]
    if url:
        return Source(url, None, sha256, src.gated)
    base = os.environ.get("SASHIMI_DOWNLOAD_BASE_URL", "").strip()
    if base:
        src = Source(f"{base.rstrip('/')}/{src.filename}", src.size, src.sha256, src.gated)
    if sha256:
        src = Source(src.url, src.size, sha256, src.gated)
    return src


def unverified_note(src: Source) -> str:
    """One line on what cannot be checked for `src` ('' when size and sha256 are both known)."""
    if src.size is None and src.sha256 is None:
        return "size and sha256 unknown (not recorded for this file): the download is not verified"
    if src.sha256 is None:
        return "sha256 unknown (not recorded for this file): only the size is verified"
    if src.size is None:
        return "size unknown (not recorded for this file): only the sha256 is verified"
    return ""


def download(
    name: str,
    out: str | os.PathLike | None = None,
    *,
    url: str | None = None,
    sha256: str | None = None,
    keep_archive: bool = False,
    force: bool = False,
    retries: int = 3,
    progress: bool = True,
) -> Path:
    """Download dataset `name` and extract it to `out` (default data/raw/<name>). Returns `out`."""
    src = resolve_source(name, url, sha256)
    out = Path(out if out is not None else Path("data/raw") / name)
    recover_dir(out)
    marker = out / MARKER
    if marker.exists() and not force:
        print(f"{out}: already downloaded ({src.filename}); use --force to fetch again")
        return out
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(
            f"{out}: exists and was not made by `sashimi download`; move it away or pass --force"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    archive = out.parent / ".archives" / src.filename
    if not archive.exists() or force:
        if force:
            with contextlib.suppress(FileNotFoundError):
                archive.unlink()
        host = urllib.parse.urlparse(src.url).hostname or ""
        token = hf_token() if host == "huggingface.co" or host.endswith(".huggingface.co") else None
        if unverified := unverified_note(src):
            print(f"{src.filename}: {unverified}")
        fetch(
            src.url,
            archive,
            size=src.size,
            sha256=src.sha256,
            token=token,
            name=name,
            retries=retries,
            progress=progress,
        )
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        extract(archive, tmp)
        content = _flatten_single_dir(tmp)
        info = {
            "dataset": name,
            "url": src.url,
            "archive": src.filename,
            "bytes": archive.stat().st_size,
            "sha256": src.sha256,
        }
        (content / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(content, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # the emptied wrapper when the archive had one top folder
    shutil.rmtree(tmp, ignore_errors=True)
    if not keep_archive:
        archive.unlink()
        with contextlib.suppress(OSError):
            archive.parent.rmdir()
    print(f"{out}: {name} ready")
    return out


# ----------------------------------------------------------------------------- CLI
def configure_parser(p: argparse.ArgumentParser) -> None:
    from sashimi.data.release import RELEASES

    p.add_argument(
        "--dataset",
        required=True,
        choices=[*sorted(DATASETS), *RELEASES],
        help="dataset archive to fetch, or release-*: the authors' release files",
    )
    p.add_argument(
        "--out",
        default=None,
        help="folder to extract into (default data/raw/<dataset>; release-*: data/raw/release)",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="MODEL",
        help="release-*: only this model's files (e.g. sashimi, sashimi_sc09); repeatable",
    )
    p.add_argument(
        "--url",
        default=None,
        help="download from this URL instead (disables the built-in checksum)",
    )
    p.add_argument("--sha256", default=None, help="expected sha256 of the archive")
    p.add_argument("--keep-archive", action="store_true", help="keep the archive after extracting")
    p.add_argument("--force", action="store_true", help="download and extract again")
    p.add_argument(
        "--retries", type=int, default=3, help="resume attempts after a dropped connection"
    )


def run(args: argparse.Namespace) -> int:
    if args.dataset.startswith("release-"):
        from sashimi.data.release import download_release

        if args.url or args.sha256 or args.keep_archive or args.force:
            raise UserError(
                f"--dataset {args.dataset}: --url/--sha256/--keep-archive/--force are for "
                "dataset archives (set HF_ENDPOINT for a mirror; delete a file to fetch it again)"
            )
        download_release(args.dataset, args.out, only=tuple(args.only), retries=args.retries)
        return 0
    if args.only:
        raise UserError(f"--only applies to release-* downloads, not --dataset {args.dataset}")
    download(
        args.dataset,
        args.out,
        url=args.url,
        sha256=args.sha256,
        keep_archive=args.keep_archive,
        force=args.force,
        retries=args.retries,
    )
    return 0
