"""`sashimi download` against a local HTTP server (Range support, faults on demand). No network."""

from __future__ import annotations

import hashlib
import io
import re
import socket
import stat
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sashimi.data import download as D
from sashimi.errors import UserError


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
        if p.is_file() and p.name != D.MARKER
    }


def test_good_tar_gz(server, monkeypatch, tmp_path):
    _register(monkeypatch, server, "toy", "toy.tar.gz", _tar_gz(FILES))
    out = D.download("toy", tmp_path / "raw" / "toy", progress=False)
    assert _tree(out) == FILES
    assert (out / D.MARKER).is_file()
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
    monkeypatch.setattr(D, "BACKOFF_S", 0.0)
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


def test_no_network_names_the_url(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/sc09.zip"
    with pytest.raises(UserError, match=f"cannot reach {re.escape(url)}"):
        D.download("sc09", tmp_path / "sc09", url=url, retries=0, progress=False)


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
    D.extract(archive, tmp_path / "x")
    assert (tmp_path / "x" / "a" / "link.txt").read_text() == "hi"


def test_corrupt_archive_message(tmp_path):
    archive = tmp_path / "bad.zip"
    archive.write_bytes(_zip(FILES)[:-40])
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="bad.zip"):
        D.extract(archive, tmp_path / "x")


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
    assert D.hf_token() is None
    (tmp_path / "token").write_text("hf_fromfile\n")
    assert D.hf_token() == "hf_fromfile"
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert D.hf_token() == "hf_env"


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
    D.recover_dir(target)
    assert (target / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    new = tmp_path / "new"
    new.mkdir()
    (new / "n.txt").write_text("new")
    D.replace_dir(new, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"] and (target / "n.txt").exists()
