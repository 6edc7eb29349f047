"""`sashimi download --dataset release-*`: the authors' release files (krandiash/sashimi-release).

The Hugging Face model repo holds the SC09 classifier (`sc09_classifier/resnext.pth`), the
generated SC09 clips of every model of the paper (`samples/sc09/...`) and the checkpoints
(`checkpoints/<model>_<dataset>.pt`). Nothing here records their sizes or checksums: the
hub's tree listing gives each file's size and, for LFS files, its sha256 (small files kept
in git: the git blob id), and every file is checked against those before it is renamed
into place. Files land at `<out>/<path in the repo>` (default out: data/raw/release),
fetched resumably (sashimi.data.fetch); a `.zip` (the README says sample folders are
zipped) is unpacked into the folder of its stem beside it. `<out>/.sashimi-<name>.json`
lists what was fetched and is written last. HF_ENDPOINT points at a mirror, as in
huggingface_hub. The files are untrusted (pickles among them): this module only copies
and unzips bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sashimi.data.archive import MARKER, unpack
from sashimi.data.fetch import Hints, fetch, hf_token
from sashimi.errors import UserError
from sashimi.io import recover_dir, write_json

REPO = "krandiash/sashimi-release"
REVISION = "main"
DEFAULT_OUT = Path("data/raw/release")
BIG = 32 << 20  # files at least this large get their own progress bar


@dataclass(frozen=True)
class Release:
    """One `--dataset release-*` target: the repo folder to list and the paths to keep."""

    folder: str
    pattern: str  # regular expression a repo path must match in full
    what: str


RELEASES: dict[str, Release] = {
    "release-classifier": Release(
        "sc09_classifier",
        r"sc09_classifier/resnext\.pth",
        "the SC09 ResNeXt classifier of the paper's FID/IS/mIS/AM",
    ),
    "release-samples-sc09": Release(
        "samples/sc09",
        r"samples/sc09/[^/]+(\.zip|/.+\.wav)",
        "the generated clips of every SC09 model",
    ),
    "release-checkpoints": Release(
        "checkpoints",
        r"checkpoints/(sashimi|samplernn|wavenet)[^/]*_(sc09|youtubemix)[^/]*\.pt",
        "SaShiMi, SampleRNN and WaveNet on SC09 and YouTubeMix",
    ),
}


@dataclass(frozen=True)
class Entry:
    """One file of the hub listing."""

    path: str
    size: int
    sha256: str | None  # LFS files
    git_sha1: str | None  # files kept in git itself: the blob id


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or "https://huggingface.co"


def file_url(path: str) -> str:
    return f"{endpoint()}/{REPO}/resolve/{REVISION}/{urllib.parse.quote(path)}"


def _token() -> str | None:
    """The HF token, sent only to huggingface.co or an endpoint the user named (HF_ENDPOINT)."""
    host = urllib.parse.urlparse(endpoint()).hostname or ""
    hub = host == "huggingface.co" or host.endswith(".huggingface.co")
    return hf_token() if hub or os.environ.get("HF_ENDPOINT", "").strip() else None


# ----------------------------------------------------------------------------- listing


def _get_json(url: str, token: str | None, timeout: float) -> tuple[object, str]:
    """GET `url` as JSON. Returns (body, Link header)."""
    req = urllib.request.Request(url, headers={"User-Agent": "sashimi-download/1.0"})
    if token:
        req.add_unredirected_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, link = resp.read(), resp.headers.get("Link") or ""
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            have = "the token found was refused" if token else "no Hugging Face token found"
            raise UserError(
                f"{url}: HTTP {e.code} ({have}); set HF_TOKEN or run `huggingface-cli login`"
            ) from None
        raise UserError(f"{url}: HTTP {e.code} {e.reason} (listing {REPO})") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"cannot reach {url} ({reason}); check the network or HF_ENDPOINT"
        ) from None
    try:
        return json.loads(raw), link
    except ValueError:
        raise UserError(f"{url}: not a JSON file listing") from None


def _entry(item: object, url: str) -> Entry | None:
    """A listing item -> Entry (None for folders); UserError for anything malformed or unsafe."""
    if not isinstance(item, dict) or item.get("type") not in ("file", "directory"):
        raise UserError(f"{url}: unexpected listing item {str(item)[:80]!r}")
    if item["type"] == "directory":
        return None
    path, size, lfs = item.get("path"), item.get("size"), item.get("lfs")
    parts = PurePosixPath(path).parts if isinstance(path, str) else ()
    if not parts or path.startswith("/") or "\\" in path or {"..", "."} & set(parts):
        raise UserError(f"{url}: refusing listed path {path!r}")
    if not isinstance(size, int) or size < 0:
        raise UserError(f"{url}: {path}: bad size {size!r}")
    sha256 = lfs.get("oid") if isinstance(lfs, dict) else None
    git_sha1 = None if sha256 else item.get("oid")
    for digest, n in ((sha256, 64), (git_sha1, 40)):
        if digest is not None and not re.fullmatch(f"[0-9a-f]{{{n}}}", str(digest)):
            raise UserError(f"{url}: {path}: bad checksum {digest!r}")
    return Entry(path, size, sha256, git_sha1)


def list_files(folder: str, token: str | None = None, timeout: float = 60.0) -> list[Entry]:
    """Every file under `folder` of the release repo, following the listing's pages."""
    url = (
        f"{endpoint()}/api/models/{REPO}/tree/{REVISION}/"
        f"{urllib.parse.quote(folder, safe='')}?recursive=true"
    )
    entries: list[Entry] = []
    while True:
        body, link = _get_json(url, token, timeout)
        if not isinstance(body, list):
            raise UserError(f"{url}: not a JSON file listing")
        entries += [e for item in body if (e := _entry(item, url)) is not None]
        m = re.search(r'<([^>]+)>\s*;\s*rel="next"', link)
        if m is None:
            break
        nxt = urllib.parse.urlsplit(m.group(1))  # kept on our endpoint (and token) whatever host
        url = f"{endpoint()}{nxt.path}" + (f"?{nxt.query}" if nxt.query else "")
    return entries


def _stem(path: str, folder: str) -> str:
    """The model a file belongs to: its first path part under `folder`, without `.zip`/`.pt`."""
    first = PurePosixPath(path).relative_to(folder).parts[0]
    return re.sub(r"\.(zip|pt|pth)$", "", first)


def select(name: str, entries: list[Entry], only: tuple[str, ...] = ()) -> list[Entry]:
    """The entries of release `name`, optionally only those of the models in `only`."""
    rel = RELEASES[name]
    keep = [e for e in entries if re.fullmatch(rel.pattern, e.path)]
    # A folder listed both zipped and as files: the files win (no extraction needed).
    listed = [PurePosixPath(e.path) for e in keep if not e.path.endswith(".zip")]
    folders = {str(parent) for path in listed for parent in path.parents}
    keep = [e for e in keep if not (e.path.endswith(".zip") and e.path[:-4] in folders)]
    if not keep:
        raise UserError(
            f"{REPO}/{rel.folder}: no files match {rel.pattern} (has the release moved?)"
        )
    if only:
        have = sorted({_stem(e.path, rel.folder) for e in keep})
        missing = [o for o in only if o not in have]
        if missing:
            raise UserError(f"--only {missing[0]}: not in {name}; choose from {', '.join(have)}")
        keep = [e for e in keep if _stem(e.path, rel.folder) in only]
    return keep


# ----------------------------------------------------------------------------- fetching


def _git_sha1(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _hints(token: str | None) -> Hints:
    """What a failed release file request tells the user: HF_TOKEN and HF_ENDPOINT, not --url."""
    have = "the token found was refused" if token else "no Hugging Face token found"
    return Hints(
        denied=f"({have}); set HF_TOKEN or run `huggingface-cli login`",
        not_found=f"listed but not served by {endpoint()}; run again, or set HF_ENDPOINT to a "
        f"complete mirror of {REPO}",
        unreachable="check the network, or set HF_ENDPOINT to a mirror",
    )


def _fetch_entry(e: Entry, root: Path, retries: int, token: str | None, progress: bool) -> str:
    """Fetch one listed file into place (a zip: extract it). Returns 'fetched' or 'kept'."""
    dest = root / e.path
    is_zip = e.path.endswith(".zip")
    folder = dest.with_suffix("") if is_zip else None
    if is_zip:
        recover_dir(folder)
        with contextlib.suppress(OSError, ValueError):
            if json.loads((folder / MARKER).read_text()).get("sha256") == e.sha256:
                return "kept"
    elif dest.is_file() and dest.stat().st_size == e.size:
        return "kept"  # checked against the listing when it was renamed into place
    staged = root / ".downloads" / e.path  # a zip fetched earlier but not yet extracted stays
    url = file_url(e.path)
    if not (staged.is_file() and staged.stat().st_size == e.size):
        fetch(url, staged, size=e.size, sha256=e.sha256, token=token, hints=_hints(token),
              retries=retries, progress=progress and e.size >= BIG)  # fmt: skip
    if e.git_sha1 is not None and _git_sha1(staged) != e.git_sha1:
        staged.unlink()
        raise UserError(
            f"{url}: git blob id mismatch (expected {e.git_sha1}); removed the download"
        )
    if not is_zip:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, dest)
        return "fetched"
    # `x.zip` may hold `x/...` or deeper single folders: down to the clips
    info = {"file": e.path, "url": url, "bytes": e.size, "sha256": e.sha256}
    unpack(staged, folder, info, deep=True)
    staged.unlink()
    return "fetched"


def _prune_empty(folder: Path) -> None:
    """Remove `folder` and the folders below it that hold no files."""
    if not folder.is_dir():
        return
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()


def download_release(
    name: str,
    out: str | os.PathLike | None = None,
    *,
    only: tuple[str, ...] = (),
    retries: int = 3,
    workers: int = 4,
    progress: bool = True,
) -> Path:
    """Fetch release `name` under `out` (default data/raw/release). Returns `out`."""
    if name not in RELEASES:
        raise UserError(f"unknown release {name!r}; choose from {', '.join(RELEASES)}")
    from tqdm import tqdm

    root = Path(out if out is not None else DEFAULT_OUT)
    token = _token()
    entries = select(name, list_files(RELEASES[name].folder, token), tuple(only))
    total = sum(e.size for e in entries)
    print(f"{name}: {len(entries)} files, {total / 1e6:,.1f} MB from {REPO}@{REVISION}; sizes and "
          "checksums are the hub listing's (none recorded here)")  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    counts = {"fetched": 0, "kept": 0}
    bar = tqdm(total=len(entries), desc=name, unit="file", disable=not progress, mininterval=1.0)
    with bar, ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        futures = [ex.submit(_fetch_entry, e, root, retries, token, progress) for e in entries]
        try:
            for fut in futures:
                counts[fut.result()] += 1
                bar.update(1)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    _prune_empty(root / ".downloads")
    files = [{"path": e.path, "bytes": e.size, "sha256": e.sha256, "git_sha1": e.git_sha1}
             for e in entries]  # fmt: skip
    write_json(root / f".sashimi-{name}.json",
               {"release": name, "repo": REPO, "revision": REVISION, "only": list(only),
                "files": files})  # fmt: skip
    print(f"{root}: {name} ready ({counts['fetched']} fetched, {counts['kept']} already there)")
    return root
