"""Download, resume, checksum and safe extraction against a local HTTP server (never the internet)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers.data import make_dataset
from resunetpp.cli import app
from resunetpp.data import download_dataset, load_pairs
from resunetpp.data.download import DownloadError, fetch, safe_extract

runner = CliRunner()


class Handler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    ranges: list[str | None] = []
    truncate_next = False  # send half the body once, then drop the connection
    honour_range = True

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        type(self).ranges.append(rng)
        start = 0
        if rng and self.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        part = body[start:]
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        if type(self).truncate_next:
            type(self).truncate_next = False
            self.wfile.write(part[: len(part) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(part)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Handler.files, Handler.ranges, Handler.truncate_next, Handler.honour_range = {}, [], False, True
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def kvasir_zip(tmp_path: Path, n: int = 5) -> bytes:
    """A zip shaped like the official kvasir-seg.zip (top folder Kvasir-SEG/), from synthetic images."""
    src = make_dataset(tmp_path / "src" / "Kvasir-SEG", n=n, size=(48, 64), image_ext=".jpg", mask_ext=".jpg")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src.parent).as_posix())
    return buf.getvalue()


def test_download_resumes_after_a_truncated_transfer(tmp_path, server):
    data = kvasir_zip(tmp_path) + b"\0" * 300_000  # padding so the first half is a real partial file
    Handler.files["/kvasir-seg.zip"] = data
    Handler.truncate_next = True
    dest = tmp_path / "dl" / "kvasir-seg.zip"
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(DownloadError, match="run again to resume"):
        fetch(server + "/kvasir-seg.zip", dest, sha256=sha, progress=False)
    part = dest.with_name("kvasir-seg.zip.part")
    assert not dest.exists() and 0 < part.stat().st_size < len(data)
    have = part.stat().st_size
    fetch(server + "/kvasir-seg.zip", dest, sha256=sha, progress=False)
    assert Handler.ranges == [None, f"bytes={have}-"]  # the second request resumed
    assert dest.read_bytes() == data and not part.exists()
    fetch(server + "/kvasir-seg.zip", dest, sha256=sha, progress=False)  # already there: no request
    assert len(Handler.ranges) == 2


def test_server_without_range_support_restarts(tmp_path, server):
    data = b"0123456789" * 1000
    Handler.files["/f.bin"] = data
    Handler.honour_range = False
    dest = tmp_path / "f.bin"
    dest.with_name("f.bin.part").write_bytes(b"garbage-prefix")
    fetch(server + "/f.bin", dest, progress=False)
    assert dest.read_bytes() == data


def test_checksum_mismatch_keeps_no_bad_archive(tmp_path, server):
    Handler.files["/kvasir-seg.zip"] = kvasir_zip(tmp_path)
    dest = tmp_path / "dl" / "kvasir-seg.zip"
    with pytest.raises(DownloadError, match="SHA-256 mismatch: expected " + "0" * 64):
        fetch(server + "/kvasir-seg.zip", dest, sha256="0" * 64, progress=False)
    assert not dest.exists() and not dest.with_name("kvasir-seg.zip.part").exists()
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(server + "/missing.zip", dest, progress=False)


def _zip_with(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return buf.getvalue()


def test_extraction_refuses_escaping_entries(tmp_path):
    link = zipfile.ZipInfo("Kvasir-SEG/link")
    link.external_attr = (0o120777 << 16)  # a symbolic link entry
    cases = {
        "../evil.txt": _zip_with([("Kvasir-SEG/images/a.jpg", b"ok"), ("../evil.txt", b"pwned")]),
        "absolute": _zip_with([("/tmp/evil-absolute.txt", b"pwned")]),
        "drive": _zip_with([("C:/evil.txt", b"pwned")]),
        "nested": _zip_with([("Kvasir-SEG/../../evil.txt", b"pwned")]),
        "symbolic link": _zip_with([(link, b"/etc/passwd")]),
    }
    for k, (what, data) in enumerate(cases.items()):
        archive = tmp_path / f"case{k}.zip"
        archive.write_bytes(data)
        target = tmp_path / "out" / f"case{k}"
        with pytest.raises(DownloadError, match="refusing") as err:
            safe_extract(archive, target)
        assert str(archive) in str(err.value)
        assert not any(target.rglob("*")), f"{what}: nothing may be extracted"
    assert not list(tmp_path.rglob("evil*")) and not Path("/tmp/evil-absolute.txt").exists()
    # tar: links refused too
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("data/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    (tmp_path / "bad.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(DownloadError, match="links and devices"):
        safe_extract(tmp_path / "bad.tar.gz", tmp_path / "tar-out")
    (tmp_path / "notarchive.zip").write_bytes(b"hello")
    with pytest.raises(DownloadError, match="not a zip or tar archive"):
        safe_extract(tmp_path / "notarchive.zip", tmp_path / "x")


def test_download_dataset_end_to_end_and_cli(tmp_path, server):
    data = kvasir_zip(tmp_path, n=5)
    Handler.files["/kvasir-seg.zip"] = data
    root, report = download_dataset("kvasir-seg", tmp_path / "data", url=server + "/kvasir-seg.zip",
                                    sha256=hashlib.sha256(data).hexdigest(), progress=False)
    assert root == tmp_path / "data" / "Kvasir-SEG" and report.ok and len(report.good_ids) == 5
    assert len(load_pairs(tmp_path / "data", size=32, progress=False)) == 5  # the --to folder works as input
    # CLI with a local archive (the CVC-ClinicDB route), and the clear message without one
    archive = tmp_path / "local.zip"
    archive.write_bytes(data)
    r = runner.invoke(app, ["data", "download", "kvasir-seg", "--to", str(tmp_path / "cli"), "--archive", str(archive)])
    assert r.exit_code == 0, r.output
    assert "5 usable pairs, OK" in r.output and "dataset ready at" in r.output
    r = runner.invoke(app, ["data", "download", "cvc-clinicdb", "--to", str(tmp_path / "cvc")])
    assert r.exit_code == 3 and "polyp.grand-challenge.org" in r.output and "downloaded archive" in r.output
    r = runner.invoke(app, ["data", "download", "kvasir-seg", "--to", str(tmp_path / "bad"), "--archive",
                            str(archive), "--sha256", "f" * 64])
    assert r.exit_code == 3 and "SHA-256 mismatch" in r.output
