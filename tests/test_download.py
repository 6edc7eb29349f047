"""`sashimi download` against a local HTTP server (Range support, faults on demand). No network."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import stat
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sashimi.data import archive as A
from sashimi.data import download as D
from sashimi.data import fetch as F
from sashimi.data import release as R
from sashimi.errors import UserError
from sashimi.io import recover_dir, replace_dir


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append(
            {
                "path": self.path,
                "range": self.headers.get("Range"),
                "auth": self.headers.get("Authorization"),
            }
        )
        if self.path in srv.status:
            body = b"denied"
            self.send_response(srv.status[self.path])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, rng = 0, self.headers.get("Range")
        if rng and not srv.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        for key, value in srv.headers.get(self.path, {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = srv.cuts.pop(0) if srv.cuts else None
        if cut is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[:cut])  # then drop the connection mid-file
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.status, srv.cuts, srv.requests, srv.ignore_range = {}, {}, [], [], False
    srv.headers = {}  # path -> extra response headers
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _tar_gz(members: dict[str, bytes], top: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(top + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(members: dict[str, bytes], top: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(top + name, data)
    return buf.getvalue()


FILES = {
    "zero/a.wav": b"RIFF" + bytes(range(256)) * 40,
    "validation_list.txt": b"zero/a.wav\n",
    "one/b.wav": b"x" * 5000,
}


def _register(
    monkeypatch, server, name: str, filename: str, data: bytes, *, gated=False, size=True, sha=True
):
    """Serve `data` as `filename` and point table entry `name` at it through the base-URL mirror."""
    server.files["/" + filename] = data
    src = D.Source(
        f"https://example.invalid/{filename}",
        len(data) if size is True else size,
        hashlib.sha256(data).hexdigest() if sha is True else sha,
        gated,
    )
    monkeypatch.setitem(D.DATASETS, name, src)
    monkeypatch.setenv("SASHIMI_DOWNLOAD_BASE_URL", server.base)


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != A.MARKER
    }


def test_good_tar_gz(server, monkeypatch, tmp_path):
    _register(monkeypatch, server, "toy", "toy.tar.gz", _tar_gz(FILES))
    out = D.download("toy", tmp_path / "raw" / "toy", progress=False)
    assert _tree(out) == FILES
    assert (out / A.MARKER).is_file()
    assert not (tmp_path / "raw" / ".archives").exists()  # archive removed after extraction
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["toy"]  # no temp folders left
    n = len(server.requests)
    D.download("toy", out, progress=False)  # already there: no request
    assert len(server.requests) == n


def test_good_zip_single_top_folder_is_flattened(server, monkeypatch, tmp_path):
    _register(monkeypatch, server, "toyzip", "toy.zip", _zip(FILES, top="sc09/"))
    out = D.download("toyzip", tmp_path / "toyzip", keep_archive=True, progress=False)
    assert _tree(out) == FILES
    assert (tmp_path / ".archives" / "toy.zip").is_file()


def test_truncated_then_resume(server, monkeypatch, tmp_path):
    data = _tar_gz(FILES)
    _register(monkeypatch, server, "toy", "toy.tar.gz", data)
    server.cuts = [len(data) // 3]
    with pytest.raises(
        UserError, match="interrupted after .* run the same command again to resume"
    ):
        D.download("toy", tmp_path / "toy", retries=0, progress=False)
    part = tmp_path / ".archives" / "toy.tar.gz.part"
    assert part.stat().st_size == len(data) // 3
    assert not (tmp_path / "toy").exists()
    out = D.download("toy", tmp_path / "toy", retries=0, progress=False)
    assert _tree(out) == FILES
    assert server.requests[-1]["range"] == f"bytes={len(data) // 3}-"


def test_dropped_connection_retries_within_one_call(server, monkeypatch, tmp_path):
    data = _zip(FILES)
    _register(monkeypatch, server, "toy", "toy.zip", data)
    server.cuts = [100, 50]
    monkeypatch.setattr(F, "BACKOFF_S", 0.0)
    out = D.download("toy", tmp_path / "toy", retries=3, progress=False)
    assert _tree(out) == FILES
    assert [r["range"] for r in server.requests] == [None, "bytes=100-", "bytes=150-"]


def test_server_ignoring_range_restarts_cleanly(server, monkeypatch, tmp_path):
    data = _tar_gz(FILES)
    _register(monkeypatch, server, "toy", "toy.tar.gz", data)
    part = tmp_path / ".archives" / "toy.tar.gz.part"
    part.parent.mkdir()
    part.write_bytes(b"garbage that must not be kept")
    server.ignore_range = True
    out = D.download("toy", tmp_path / "toy", progress=False)
    assert _tree(out) == FILES


def test_wrong_checksum_leaves_nothing(server, monkeypatch, tmp_path):
    _register(monkeypatch, server, "toy", "toy.tar.gz", _tar_gz(FILES), sha="0" * 64)
    with pytest.raises(UserError, match="sha256 mismatch"):
        D.download("toy", tmp_path / "toy", progress=False)
    assert not (tmp_path / "toy").exists()
    assert not any((tmp_path / ".archives").iterdir())


def test_size_mismatch_is_an_error(server, monkeypatch, tmp_path):
    data = _tar_gz(FILES)
    _register(monkeypatch, server, "toy", "toy.tar.gz", data, size=len(data) + 10)
    with pytest.raises(
        UserError, match=f"server file is {len(data):,} bytes but {len(data) + 10:,}"
    ):
        D.download("toy", tmp_path / "toy", progress=False)
    assert not (tmp_path / "toy").exists()
    assert not any((tmp_path / ".archives").iterdir())


def test_401_explains_gated_access_and_token_stays_home(server, monkeypatch, tmp_path):
    _register(monkeypatch, server, "beethoven", "beethoven.zip", b"zip", gated=True)
    server.status["/beethoven.zip"] = 401
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    with pytest.raises(UserError) as e:
        D.download("beethoven", tmp_path / "b", progress=False)
    msg = str(e.value)
    assert (
        "HTTP 401" in msg
        and "huggingface.co/datasets/krandiash/beethoven" in msg
        and "HF_TOKEN" in msg
    )
    assert "\n" not in msg
    assert server.requests[0]["auth"] is None  # the token is only sent to huggingface.co


def test_403_on_an_open_archive_says_access_denied(server, monkeypatch, tmp_path):
    _register(monkeypatch, server, "toy", "toy.zip", b"zip")
    server.status["/toy.zip"] = 403
    with pytest.raises(UserError) as e:
        D.download("toy", tmp_path / "toy", progress=False)
    assert str(e.value) == (
        f"{server.base}/toy.zip: HTTP 403 access denied "
        "(pass a working --url, or set HF_TOKEN for Hugging Face)"
    )
    assert not (tmp_path / "toy").exists()


def _dead_base() -> str:
    """An http:// base URL on a local port where nothing listens."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


def test_no_network_names_the_url_and_hints_at_url(tmp_path):
    url = f"{_dead_base()}/sc09.zip"
    with pytest.raises(UserError, match=f"cannot reach {re.escape(url)}") as e:
        D.download("sc09", tmp_path / "sc09", url=url, retries=0, progress=False)
    assert str(e.value).endswith("); check the network or pass another --url")


def test_404_hints_at_url(server, tmp_path):
    url = f"{server.base}/moved.zip"
    with pytest.raises(UserError) as e:
        D.download("fsdd", tmp_path / "f", url=url, progress=False)
    assert str(e.value) == f"{url}: HTTP 404 not found (pass the right archive with --url)"
    assert not (tmp_path / "f").exists()


def test_custom_url_with_sha256(server, tmp_path):
    data = _zip(FILES)
    server.files["/x.zip"] = data
    out = D.download(
        "fsdd",
        tmp_path / "f",
        url=server.base + "/x.zip",
        sha256=hashlib.sha256(data).hexdigest(),
        progress=False,
    )
    assert _tree(out) == FILES


# ----------------------------------------------------------------------------- local archives


def _on_disk(tmp_path: Path, name: str, data: bytes) -> Path:
    """`data` as an archive the user already has (a local mirror)."""
    path = tmp_path / "mirror" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _all_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_file_url_is_checked_and_unpacked_in_place(monkeypatch, tmp_path, capsys):
    data = _zip(FILES, top="free-spoken-digit-dataset-1.0.10/")
    path = _on_disk(tmp_path, "fsdd mirror.zip", data)  # a space: %20 in the URL

    def no_fetch(*args, **kwargs):
        raise AssertionError("a local archive must not go through fetch (no copy)")

    monkeypatch.setattr(D, "fetch", no_fetch)
    sha = hashlib.sha256(data).hexdigest()
    out = tmp_path / "raw" / "fsdd"
    D.download("fsdd", out, url=path.as_uri(), sha256=sha, progress=False)
    assert "%20" in path.as_uri() and _tree(out) == FILES
    assert path.read_bytes() == data  # the user's archive stays, untouched
    # nothing but the archive and the unpacked files: no .archives copy, no temp folder
    assert _all_files(tmp_path) == sorted(
        ["mirror/fsdd mirror.zip", f"raw/fsdd/{A.MARKER}", *(f"raw/fsdd/{n}" for n in FILES)]
    )
    marker = json.loads((out / A.MARKER).read_text())
    assert marker["url"] == path.as_uri() and marker["bytes"] == len(data)
    assert marker["sha256"] == sha and marker["archive"] == "fsdd mirror.zip"
    assert (
        "fsdd mirror.zip: size unknown (not recorded for this file): only the sha256 is verified"
        in capsys.readouterr().out
    )


def test_plain_path_through_the_cli(monkeypatch, tmp_path, capsys):
    from sashimi.cli import main

    data = _tar_gz(FILES)
    _on_disk(tmp_path, "speech.tar.gz", data)
    monkeypatch.chdir(tmp_path)
    args = ["download", "--dataset", "fsdd", "--url", "mirror/speech.tar.gz", "--out", "raw/f"]
    assert main(args) == 0
    assert _tree(tmp_path / "raw/f") == FILES
    assert (tmp_path / "mirror/speech.tar.gz").read_bytes() == data
    assert main(args) == 0  # already there
    assert "already downloaded" in capsys.readouterr().out
    assert main([*args[:4], "mirror/gone.tar.gz", *args[5:], "--force"]) == 2
    assert capsys.readouterr().err.strip() == "error: mirror/gone.tar.gz: no such file"
    assert _tree(tmp_path / "raw/f") == FILES  # a failed --force keeps what was there


def test_local_mirror_keeps_the_table_size_and_sha256(monkeypatch, tmp_path):
    data = _zip(FILES)
    path = _on_disk(tmp_path, "toy.zip", data)
    sha = hashlib.sha256(data).hexdigest()
    monkeypatch.setenv("SASHIMI_DOWNLOAD_BASE_URL", path.parent.as_uri())
    bad = [
        (len(data), "0" * 64, f"sha256 mismatch (got {sha}, expected {'0' * 64}); file left as is"),
        (
            len(data) + 1,
            sha,
            f"file is {len(data):,} bytes but {len(data) + 1:,} were expected (wrong archive?)",
        ),
    ]
    for size, digest, msg in bad:
        monkeypatch.setitem(D.DATASETS, "toy", D.Source("https://x.invalid/toy.zip", size, digest))
        with pytest.raises(UserError) as e:
            D.download("toy", tmp_path / "raw" / "toy", progress=False)
        assert str(e.value) == f"{path}: {msg}"
        assert path.read_bytes() == data and not (tmp_path / "raw" / "toy").exists()
    monkeypatch.setitem(D.DATASETS, "toy", D.Source("https://x.invalid/toy.zip", len(data), sha))
    assert _tree(D.download("toy", tmp_path / "raw" / "toy", progress=False)) == FILES
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["toy"]


def _flip_inside(data: bytes, needle: bytes) -> bytes:
    """`data` with one bit flipped in the middle of `needle` (a stored zip member)."""
    out = bytearray(data)
    out[data.index(needle) + len(needle) // 2] ^= 1
    return bytes(out)


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing", "{path}: no such file"),
        ("folder", "{path}: is a folder, not an archive file"),
        ("truncated", "{path}: not a zip or tar archive"),
        ("truncated-tar", "{path}: corrupt archive (EOFError: "),
        ("corrupt", "{path}: corrupt archive (BadZipFile: Bad CRC-32 for file 'one/b.wav')"),
        ("other-host", "file://elsewhere{path}: a file:// URL must name a file on this machine"),
    ],
)
def test_local_archive_errors_name_the_file(tmp_path, case, expect):
    data = _zip(FILES)
    path = tmp_path / "mirror" / "x.zip"
    if case == "folder":
        path.mkdir(parents=True)
    elif case == "truncated":
        path = _on_disk(tmp_path, "x.zip", data[: len(data) // 2])
    elif case == "truncated-tar":
        path = _on_disk(tmp_path, "x.tar.gz", _tar_gz(FILES)[:-200])
    elif case == "corrupt":
        path = _on_disk(tmp_path, "x.zip", _flip_inside(data, FILES["one/b.wav"]))
    url = f"file://elsewhere{path}" if case == "other-host" else path.as_uri()
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(UserError) as e:
        D.download("fsdd", tmp_path / "raw" / "f", url=url, progress=False)
    msg = str(e.value)
    assert msg.startswith(expect.format(path=path)) and "\n" not in msg
    assert not (tmp_path / "raw" / "f").exists()
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())
    if before is not None:
        assert path.read_bytes() == before  # never removed: the file is the user's


@pytest.mark.parametrize(
    "member",
    ["../evil.txt", "/abs/evil.txt", "ok/../../evil.txt"],
)
@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_path_traversal_refused(server, monkeypatch, tmp_path, member, fmt):
    members = {"fine.txt": b"ok", member: b"evil"}
    if fmt == "tar":
        _register(monkeypatch, server, "toy", "toy.tar.gz", _tar_gz(members))
    else:
        _register(monkeypatch, server, "toy", "toy.zip", _zip(members))
    with pytest.raises(UserError, match="refusing unsafe archive member"):
        D.download("toy", tmp_path / "sub" / "toy", progress=False)
    assert not (tmp_path / "sub" / "toy").exists()
    assert not list(tmp_path.rglob("evil.txt"))
    assert [p.name for p in (tmp_path / "sub").iterdir()] == [".archives"]  # no temp folder left


@pytest.mark.parametrize("target", ["/etc/passwd", "../../outside"])
@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_symlink_escaping_refused(server, monkeypatch, tmp_path, target, fmt):
    buf = io.BytesIO()
    if fmt == "tar":
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            info = tarfile.TarInfo("data/link")
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
        name = "toy.tar.gz"
    else:
        with zipfile.ZipFile(buf, "w") as zf:
            info = zipfile.ZipInfo("data/link")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
        name = "toy.zip"
    _register(monkeypatch, server, "toy", name, buf.getvalue())
    with pytest.raises(UserError, match="points outside the target folder"):
        D.download("toy", tmp_path / "toy", progress=False)
    assert not (tmp_path / "toy").exists()


def test_inside_symlink_allowed(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("a/real.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
        link = tarfile.TarInfo("a/link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "real.txt"
        tf.addfile(link)
    archive = tmp_path / "t.tar"
    archive.write_bytes(buf.getvalue())
    (tmp_path / "x").mkdir()
    A.extract(archive, tmp_path / "x")
    assert (tmp_path / "x" / "a" / "link.txt").read_text() == "hi"


def test_corrupt_archive_message(tmp_path):
    archive = tmp_path / "bad.zip"
    archive.write_bytes(_zip(FILES)[:-40])
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="bad.zip"):
        A.extract(archive, tmp_path / "x")


def test_existing_foreign_folder_is_not_replaced(server, monkeypatch, tmp_path):
    _register(monkeypatch, server, "toy", "toy.zip", _zip(FILES))
    out = tmp_path / "toy"
    out.mkdir()
    (out / "mine.wav").write_bytes(b"precious")
    with pytest.raises(UserError, match="not made by `sashimi download`"):
        D.download("toy", out, progress=False)
    assert (out / "mine.wav").read_bytes() == b"precious"
    D.download("toy", out, force=True, progress=False)
    assert _tree(out) == FILES


def test_hf_token_sources(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert F.hf_token() is None
    (tmp_path / "token").write_text("hf_fromfile\n")
    assert F.hf_token() == "hf_fromfile"
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert F.hf_token() == "hf_env"


def test_table_and_cli(server, monkeypatch, tmp_path):
    assert {
        "beethoven",
        "youtubemix",
        "sc09",
        "speech-commands-v2",
        "speech-commands-v1",
        "fsdd",
    } <= set(D.DATASETS)
    assert D.DATASETS["speech-commands-v2"].size == 2_428_923_189
    assert D.DATASETS["speech-commands-v1"].sha256.startswith("743935421bb5")
    assert D.DATASETS["beethoven"].gated and D.DATASETS["youtubemix"].gated
    from sashimi.cli import main

    _register(
        monkeypatch,
        server,
        "fsdd",
        "v1.0.10.zip",
        _zip(FILES, top="free-spoken-digit-dataset-1.0.10/"),
    )
    assert main(["download", "--dataset", "fsdd", "--out", str(tmp_path / "fsdd")]) == 0
    assert _tree(tmp_path / "fsdd") == FILES
    server.status["/v1.0.10.zip"] = 403
    assert main(["download", "--dataset", "fsdd", "--out", str(tmp_path / "f2")]) == 2


def test_recover_dir_after_interrupted_replace(tmp_path):
    target = tmp_path / "data"
    old = tmp_path / ".data.old-abc"  # a crash between replace_dir's two renames leaves this
    old.mkdir()
    (old / "keep.txt").write_text("old")
    (tmp_path / ".data.tmp-xyz").mkdir()  # an unfinished new folder
    recover_dir(target)
    assert (target / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    new = tmp_path / "new"
    new.mkdir()
    (new / "n.txt").write_text("new")
    replace_dir(new, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"] and (target / "n.txt").exists()


# ----------------------------------------------------------------------------- hosted names


def test_hosted_archive_names():
    """The file names on the authors' dataset repos (their README: unzip `<dataset>.zip`)."""
    assert D.DATASETS["youtubemix"].url.endswith(
        "/krandiash/youtubemix/resolve/main/youtube_mix.zip"
    )
    assert D.DATASETS["beethoven"].url.endswith("/krandiash/beethoven/resolve/main/beethoven.zip")
    assert D.DATASETS["sc09"].filename == "sc09.zip"


def test_unknown_size_and_checksum_said_in_one_line(server, monkeypatch, tmp_path, capsys):
    data = _zip(FILES, top="beethoven/")
    _register(monkeypatch, server, "beethoven", "beethoven.zip", data, size=None, sha=None)
    out = D.download("beethoven", tmp_path / "beethoven", progress=False)
    assert _tree(out) == FILES
    notes = [line for line in capsys.readouterr().out.splitlines() if "not verified" in line]
    assert notes == [
        "beethoven.zip: size and sha256 unknown (not recorded for this file): "
        "the download is not verified"
    ]
    _register(monkeypatch, server, "toy", "toy.zip", data)  # both known: no such line
    D.download("toy", tmp_path / "toy", progress=False)
    assert "not recorded" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- release files

TREE = "/api/models/krandiash/sashimi-release/tree/main/"
RESOLVE = "/krandiash/sashimi-release/resolve/main/"


def _listing(server, folder: str, files: dict[str, bytes], *, lfs=True, pages=1, bad_sha=()):
    """Serve `files` (repo path -> bytes) and the hub's tree listing of `folder`, in `pages` pages."""
    items = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": folder}]
    for path, data in files.items():
        server.files[RESOLVE + path] = data
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        item = {"type": "file", "oid": blob, "size": len(data), "path": path}
        if lfs:
            sha = "f" * 64 if path in bad_sha else hashlib.sha256(data).hexdigest()
            item["lfs"] = {"oid": sha, "size": len(data), "pointerSize": 134}
        items.append(item)
    url = f"{TREE}{folder.replace('/', '%2F')}?recursive=true"
    step = -(-len(items) // pages)
    for k in range(pages):
        page = url if k == 0 else f"{url}&cursor={k}"
        server.files[page] = json.dumps(items[k * step : (k + 1) * step]).encode()
        if k + 1 < pages:
            nxt = f"https://huggingface.co{url}&cursor={k + 1}"  # the hub names itself
            server.headers[page] = {"Link": f'<{nxt}>; rel="next"'}


@pytest.fixture
def hub(server, monkeypatch, tmp_path):
    """The local server as the Hugging Face endpoint, with a token that only it should see."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    monkeypatch.setattr(F, "BACKOFF_S", 0.0)
    return server


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def test_release_classifier_only_the_checkpoint(hub, monkeypatch, tmp_path):
    weights = b"PK\x03\x04 not really a pickle" * 500
    cache = {"sc09_classifier/cache/train_probs.npy": b"\x93NUMPY" + b"0" * 100}
    _listing(hub, "sc09_classifier", {"sc09_classifier/resnext.pth": weights, **cache})
    monkeypatch.setenv("HF_TOKEN", "hf_release")
    root = R.download_release("release-classifier", tmp_path / "release", progress=False)
    assert _files(root) == {"sc09_classifier/resnext.pth": weights}  # the cache is not fetched
    assert not (root / ".downloads").exists()
    record = json.loads((root / ".sashimi-release-classifier.json").read_text())
    assert record["repo"] == "krandiash/sashimi-release"
    assert [f["path"] for f in record["files"]] == ["sc09_classifier/resnext.pth"]
    assert record["files"][0]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert {r["auth"] for r in hub.requests} == {"Bearer hf_release"}  # HF_ENDPOINT was named
    n = len(hub.requests)
    R.download_release("release-classifier", root, progress=False)
    assert [r["path"] for r in hub.requests[n:]] == [f"{TREE}sc09_classifier?recursive=true"]


def test_release_samples_folders_zips_and_pages(hub, tmp_path):
    wavs = {f"samples/sc09/sashimi/{i}.wav": b"RIFF" + bytes([i]) * (300 + i) for i in range(5)}
    wavs["samples/sc09/sashimi/README.txt"] = b"not a clip"
    clips = {"0.wav": b"RIFFa" * 50, "1.wav": b"RIFFb" * 60}
    zipped = _zip(clips, top="samples/sc09/2048-diffwave-500k/")  # nested: flattened to the clips
    files = {
        **wavs,
        "samples/sc09/2048-diffwave-500k.zip": zipped,
        "samples/sc09/sashimi.zip": _zip({"other.wav": b"x"}),  # also listed unzipped: skipped
    }
    _listing(hub, "samples/sc09", files, lfs=False, pages=3)
    root = R.download_release("release-samples-sc09", tmp_path / "release", progress=False)
    got = _files(root)
    assert got.pop("samples/sc09/2048-diffwave-500k/0.wav") == b"RIFFa" * 50
    assert got.pop("samples/sc09/2048-diffwave-500k/1.wav") == b"RIFFb" * 60
    wavs.pop("samples/sc09/sashimi/README.txt")
    assert got == wavs
    assert not (root / "samples/sc09/2048-diffwave-500k.zip").exists()
    pages = [r["path"] for r in hub.requests if r["path"].startswith(TREE)]
    assert len(pages) == 3
    assert RESOLVE + "samples/sc09/sashimi.zip" not in [r["path"] for r in hub.requests]


def test_release_only_selects_models_through_the_cli(hub, tmp_path, capsys):
    from sashimi.cli import main

    files = {
        "samples/sc09/sashimi/0.wav": b"s" * 100,
        "samples/sc09/wavenet/0.wav": b"w" * 100,
    }
    _listing(hub, "samples/sc09", files)
    out = tmp_path / "release"
    args = ["download", "--dataset", "release-samples-sc09", "--out", str(out)]
    assert main([*args, "--only", "sashimi"]) == 0
    assert _files(out) == {"samples/sc09/sashimi/0.wav": b"s" * 100}
    assert main([*args, "--only", "diffwave"]) == 2
    err = capsys.readouterr().err
    assert "--only diffwave: not in release-samples-sc09; choose from sashimi, wavenet" in err
    assert main([*args, "--url", "http://127.0.0.1:9/x.zip"]) == 2


def test_release_checkpoints_of_the_paper_models(hub, tmp_path):
    files = {
        "checkpoints/sashimi_sc09.pt": b"a" * 64,
        "checkpoints/sashimi_sc09_unet.pt": b"b" * 64,
        "checkpoints/wavenet_youtubemix.pt": b"c" * 64,
        "checkpoints/samplernn_sc09.pt": b"d" * 64,
        "checkpoints/s4-wt103.pt": b"e" * 64,  # not an audio model of the paper
    }
    _listing(hub, "checkpoints", files)
    root = R.download_release("release-checkpoints", tmp_path / "r", progress=False)
    assert sorted(_files(root)) == sorted(p for p in files if "wt103" not in p)


def test_release_truncated_file_then_resume(hub, tmp_path):
    data = bytes(range(256)) * 64
    _listing(hub, "checkpoints", {"checkpoints/sashimi_youtubemix.pt": data})
    hub.cuts = [None, 5000]  # the listing whole, then the file cut
    with pytest.raises(UserError) as e:
        R.download_release("release-checkpoints", tmp_path / "r", retries=0, progress=False)
    msg = str(e.value)
    assert "checkpoints/sashimi_youtubemix.pt: download interrupted after 5,000 bytes" in msg
    assert "run the same command again to resume" in msg and "\n" not in msg
    assert not (tmp_path / "r/checkpoints/sashimi_youtubemix.pt").exists()
    part = tmp_path / "r/.downloads/checkpoints/sashimi_youtubemix.pt.part"
    assert part.stat().st_size == 5000
    R.download_release("release-checkpoints", tmp_path / "r", retries=0, progress=False)
    assert (tmp_path / "r/checkpoints/sashimi_youtubemix.pt").read_bytes() == data
    assert hub.requests[-1]["range"] == "bytes=5000-"
    assert not (tmp_path / "r/.downloads").exists()


@pytest.mark.parametrize("lfs", [True, False])
def test_release_checksum_mismatch_leaves_nothing(hub, tmp_path, lfs):
    path = "sc09_classifier/resnext.pth"
    _listing(hub, "sc09_classifier", {path: b"x" * 1000}, lfs=lfs, bad_sha=(path,))
    if not lfs:  # a git-stored file: its blob id is what is checked
        hub.files[RESOLVE + path] = b"y" * 1000
    with pytest.raises(UserError, match="sha256 mismatch" if lfs else "git blob id mismatch"):
        R.download_release("release-classifier", tmp_path / "r", progress=False)
    assert _files(tmp_path / "r") == {}


@pytest.mark.parametrize("fault", ["404", "403", "unreachable"])
def test_release_file_errors_hint_at_hf_not_url(hub, monkeypatch, tmp_path, fault):
    path = "checkpoints/sashimi_sc09.pt"
    _listing(hub, "checkpoints", {path: b"a" * 64})
    url = f"{hub.base}{RESOLVE}{path}"
    if fault == "404":
        del hub.files[RESOLVE + path]
    elif fault == "403":
        hub.status[RESOLVE + path] = 403
    else:
        dead = _dead_base()
        url = f"{dead}{RESOLVE}{path}"
        monkeypatch.setattr(R, "file_url", lambda p: f"{dead}{RESOLVE}{p}")
    with pytest.raises(UserError) as e:
        R.download_release("release-checkpoints", tmp_path / "r", retries=0, progress=False)
    msg = str(e.value)
    expect = {
        "404": f"{url}: HTTP 404 not found (listed but not served by {hub.base}; run again, or "
        "set HF_ENDPOINT to a complete mirror of krandiash/sashimi-release)",
        "403": f"{url}: HTTP 403 (no Hugging Face token found); set HF_TOKEN or run "
        "`huggingface-cli login`",
    }
    if fault in expect:
        assert msg == expect[fault]
    else:
        assert msg.startswith(f"cannot reach {url} (")
        assert msg.endswith("); check the network, or set HF_ENDPOINT to a mirror")
    assert "--url" not in msg  # `--dataset release-*` refuses --url
    assert not list(tmp_path.rglob("*.pt"))


def test_release_listing_errors(hub, tmp_path):
    with pytest.raises(UserError, match=r"tree/main/checkpoints\?recursive=true: HTTP 404"):
        R.download_release("release-checkpoints", tmp_path / "r", progress=False)
    hub.status[f"{TREE}checkpoints?recursive=true"] = 401
    with pytest.raises(UserError, match=r"no Hugging Face token found\); set HF_TOKEN"):
        R.download_release("release-checkpoints", tmp_path / "r", progress=False)
    hub.status.clear()
    evil = [{"type": "file", "oid": "0" * 40, "size": 4, "path": "checkpoints/../../evil.pt"}]
    hub.files[f"{TREE}checkpoints?recursive=true"] = json.dumps(evil).encode()
    with pytest.raises(UserError, match="refusing listed path 'checkpoints/../../evil.pt'"):
        R.download_release("release-checkpoints", tmp_path / "r", progress=False)
    _listing(hub, "checkpoints", {"checkpoints/s4-wt103.pt": b"e"})
    with pytest.raises(UserError, match="no files match"):
        R.download_release("release-checkpoints", tmp_path / "r", progress=False)
    assert not list(tmp_path.rglob("*.pt"))
