"""Unpack an archive into a folder safely and atomically.

`extract` refuses members (and links) that would land outside the target folder, for zip
and tar alike, before writing anything. `unpack` extracts into a temp folder beside the
target and renames it over the target once complete, with a MARKER file saying what it
came from (the rename is `sashimi.io.replace_dir`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from sashimi.errors import UserError
from sashimi.io import replace_dir

MARKER = ".sashimi-download.json"  # written into the unpacked folder last-before-rename


def unpack(archive: Path, folder: Path, info: dict, *, deep: bool = False) -> None:
    """Extract `archive` to `folder` (replaced whole), with `info` written to its MARKER.

    An archive holding one top folder (`sc09/...`) is unpacked from inside it; `deep`
    strips every such level (`x.zip` holding `x/y/...`), not just the first.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        extract(archive, tmp)
        content = _single_top(tmp)
        while deep and (inner := _single_top(content)) != content:
            content = inner
        (content / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(content, folder)
    finally:  # also the emptied wrapper when the archive had one top folder
        shutil.rmtree(tmp, ignore_errors=True)


def _single_top(folder: Path) -> Path:
    """The one folder inside `folder` (macOS metadata aside), else `folder` itself."""
    entries = [p for p in folder.iterdir() if p.name not in ("__MACOSX", MARKER)]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return folder


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
    """UserError if link `name` -> `target` would point outside `root`."""
    link_dir = (root / PurePosixPath(name)).parent
    dest = (link_dir / target).resolve() if not os.path.isabs(target) else Path(target).resolve()
    if dest != root and root not in dest.parents:
        raise UserError(
            f"{archive}: refusing archive link {name!r} -> {target!r} (points outside the target folder)"
        )
