"""`sashimi download --dataset NAME [--out DIR]`: fetch and unpack a dataset archive.

The table of archives (DATASETS) and the CLI. The archive is fetched resumably and checked
against the size and sha256 recorded here where known (sashimi.data.fetch), then unpacked
safely into a folder that replaces `--out` only once complete (sashimi.data.archive).
Archives are kept in `<out>/../.archives/` until extraction succeeds (then deleted unless
`--keep-archive`). `SASHIMI_DOWNLOAD_BASE_URL` points every dataset at a mirror
(`<base>/<archive file name>`), e.g. a local server in tests. A `file://` URL or a plain
path (as `--url` or mirror) is an archive already on disk: it is checked and unpacked in
place, never copied or removed. `--dataset release-*` fetches the authors' release files
instead (sashimi.data.release).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sashimi.data.archive import MARKER, unpack
from sashimi.data.fetch import Hints, check_local, fetch, hf_token, local_path
from sashimi.data.release import RELEASES, download_release
from sashimi.errors import UserError
from sashimi.io import recover_dir

HF = "https://huggingface.co/datasets/krandiash"
DENIED = "access denied (pass a working --url, or set HF_TOKEN for Hugging Face)"
NOT_FOUND = "pass the right archive with --url"
UNREACHABLE = "check the network or pass another --url"


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


def _denied(name: str, src: Source) -> str:
    """What an HTTP 401/403 error says after the code: for a gated dataset, how to get access."""
    if not src.gated:
        return DENIED
    have = "the token found was refused" if hf_token() else "no Hugging Face token found"
    return (
        f"({have}); accept the dataset terms on "
        f"https://huggingface.co/datasets/krandiash/{name} while logged in, then set "
        f"HF_TOKEN to a token of that account (or run `huggingface-cli login`)"
    )


def _fetch_archive(
    name: str, src: Source, folder: Path, *, force: bool, retries: int, progress: bool
) -> Path:
    """The archive of `src` in `folder`, fetched unless a complete copy is there already."""
    archive = folder / src.filename
    if archive.exists() and not force:
        return archive
    with contextlib.suppress(FileNotFoundError):
        archive.unlink()
    if unverified := unverified_note(src):
        print(f"{src.filename}: {unverified}")
    host = urllib.parse.urlparse(src.url).hostname or ""
    token = hf_token() if host == "huggingface.co" or host.endswith(".huggingface.co") else None
    hints = Hints(denied=_denied(name, src), not_found=NOT_FOUND, unreachable=UNREACHABLE)
    return fetch(
        src.url,
        archive,
        size=src.size,
        sha256=src.sha256,
        token=token,
        hints=hints,
        retries=retries,
        progress=progress,
    )


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
    local = local_path(src.url)  # an archive already on disk: checked and read in place
    if local is None:
        archive = _fetch_archive(
            name, src, out.parent / ".archives", force=force, retries=retries, progress=progress
        )
    else:
        archive = check_local(local, size=src.size, sha256=src.sha256)
        if unverified := unverified_note(src):
            print(f"{local.name}: {unverified}")
    info = {
        "dataset": name,
        "url": local.resolve().as_uri() if local is not None else src.url,
        "archive": archive.name,
        "bytes": archive.stat().st_size,
        "sha256": src.sha256,
    }
    unpack(archive, out, info)
    if local is None and not keep_archive:
        archive.unlink()
        with contextlib.suppress(OSError):
            archive.parent.rmdir()
    print(f"{out}: {name} ready")
    return out


# ----------------------------------------------------------------------------- CLI
def configure_parser(p: argparse.ArgumentParser) -> None:
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
        help="download from this URL instead, or unpack a local archive (file:///path or a "
        "path); disables the built-in checksum",
    )
    p.add_argument("--sha256", default=None, help="expected sha256 of the archive")
    p.add_argument("--keep-archive", action="store_true", help="keep the archive after extracting")
    p.add_argument("--force", action="store_true", help="download and extract again")
    p.add_argument(
        "--retries", type=int, default=3, help="resume attempts after a dropped connection"
    )


def run(args: argparse.Namespace) -> int:
    if args.dataset.startswith("release-"):
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
