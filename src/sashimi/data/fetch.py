"""Resumable, verified HTTP(S) download of one file: `fetch(url, dest, size=, sha256=, hints=)`.

The bytes go to `<dest>.part`, continued with an HTTP Range request after a dropped
connection (retried with backoff, or on the next call), and `dest` appears only once the
size and sha256 (where known) match. Errors are one-line UserErrors naming the URL and
ending with the caller's `Hints` (what its user can change). A `file://` URL or a plain
path is a local file instead: `local_path` names it and `check_local` verifies it in place.
`hf_token` finds the Hugging Face token the way `huggingface-cli` stores it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sashimi.errors import UserError

CHUNK = 1 << 20
BACKOFF_S = 1.0  # wait before retry k: BACKOFF_S * 2^(k-1) seconds, at most 30

# Worth retrying (the server was reached); anything else (DNS, refused, unreachable) is reported at once.
_TRANSIENT = (
    ConnectionResetError,
    ConnectionAbortedError,
    TimeoutError,
    http.client.RemoteDisconnected,
)
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class Hints:
    """The caller's words for what its user can do when a request fails for good."""

    denied: str  # after "URL: HTTP 401" / "HTTP 403"
    not_found: str  # in the parentheses of "URL: HTTP 404 not found (...)"
    unreachable: str  # after "cannot reach URL (reason); "


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
    with open(path, "rb") as f:
        return _sha256_stream(f)


def _sha256_stream(f) -> str:
    h = hashlib.sha256()
    while block := f.read(CHUNK):
        h.update(block)
    return h.hexdigest()


def local_path(url: str) -> Path | None:
    """The file that a `file://` URL or a plain path names; None for an http(s) URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("http", "https"):
        return None
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UserError(f"{url}: a file:// URL must name a file on this machine (file:///path)")
        return Path(urllib.request.url2pathname(parts.path))
    if parts.scheme == "":
        return Path(url).expanduser()
    raise UserError(f"{url}: unsupported URL scheme (use http://, https://, file:// or a path)")


def check_local(path: Path, *, size: int | None = None, sha256: str | None = None) -> Path:
    """`path` once it is a readable file of the expected size and sha256 (where known).

    Read in place, never copied, moved or removed: the file is the user's. A mismatch is a
    UserError naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            got = os.fstat(f.fileno()).st_size
            if size is not None and got != size:
                raise UserError(
                    f"{path}: file is {got:,} bytes but {size:,} were expected (wrong archive?)"
                )
            digest = _sha256_stream(f) if sha256 is not None else None
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not an archive file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if digest is not None and digest != sha256.lower():
        raise UserError(
            f"{path}: sha256 mismatch (got {digest}, expected {sha256}); file left as is"
        )
    return path


def fetch(
    url: str,
    dest: Path,
    *,
    size: int | None = None,
    sha256: str | None = None,
    token: str | None = None,
    hints: Hints,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download `url` to `dest` (resuming `dest.part`), verify size/sha256, rename into place.

    A connection that drops is retried `retries` times from where it stopped; when retries
    run out the partial file is kept and the next call resumes it. A wrong size or checksum
    removes the partial file and raises UserError. `hints` ends the error of a request that
    is refused, not found or cannot reach the host.
    """
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise UserError(f"{url}: not an http:// or https:// URL")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        try:
            _fetch_once(
                url, part, size=size, token=token, hints=hints, timeout=timeout, progress=progress
            )
            break
        except _Interrupted as e:
            if attempt < retries:
                attempt += 1
                time.sleep(min(BACKOFF_S * 2 ** (attempt - 1), 30.0))
                continue
            raise UserError(
                f"{url}: download interrupted after {e.have:,} bytes ({e.reason}); run the same command again to resume"
            ) from None
    _verify(url, part, size, sha256)
    os.replace(part, dest)
    return dest


def _verify(url: str, part: Path, size: int | None, sha256: str | None) -> None:
    """UserError (and `part` removed) unless its size and sha256 are the expected ones."""
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


class _Interrupted(Exception):
    """The transfer stopped after `have` bytes of `part` for a reason worth a retry."""

    def __init__(self, have: int, reason: str):
        self.have, self.reason = have, reason


def _fetch_once(
    url: str,
    part: Path,
    *,
    size: int | None,
    token: str | None,
    hints: Hints,
    timeout: float,
    progress: bool,
) -> None:
    """One HTTP request continuing `part`; returns once the file is complete (per the server)."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if size is not None and have == size and part.exists():
        return
    with _request(url, part, have, token=token, hints=hints, timeout=timeout) as resp:
        have, mode, total = _resume_point(resp, url, part, have, size)
        expected_total = total if total is not None else size
        bar = _progress_bar(part.name, expected_total, have, progress)
        try:
            written = _copy_body(resp, part, mode, have, bar)
        finally:
            bar.close()
    if expected_total is not None and written < expected_total:
        raise _Interrupted(written, f"connection closed at {written:,} of {expected_total:,} bytes")


def _request(url: str, part: Path, have: int, *, token: str | None, hints: Hints, timeout: float):
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
            raise UserError(f"{url}: HTTP {e.code} {hints.denied}") from None
        if e.code == 416 and have:  # our partial file is at least as long as the server's file
            part.unlink()
            raise _Interrupted(
                0, "server refused the resume range; restarting from scratch"
            ) from None
        if e.code == 404:
            raise UserError(f"{url}: HTTP 404 not found ({hints.not_found})") from None
        if e.code >= 500:
            raise _Interrupted(have, f"HTTP {e.code}") from None
        raise UserError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, _TRANSIENT):
            raise _Interrupted(have, f"{type(reason).__name__}") from None
        raise UserError(f"cannot reach {url} ({reason}); {hints.unreachable}") from None


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
