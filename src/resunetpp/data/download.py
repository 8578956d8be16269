"""Download, verify and unpack the public datasets (stdlib urllib only).

- Kvasir-SEG: the official archive https://datasets.simula.no/downloads/kvasir-seg.zip (a top folder
  ``Kvasir-SEG/`` with ``images/`` and ``masks/``).
- CVC-ClinicDB: no stable direct URL. The official copy is distributed by its authors via
  https://polyp.grand-challenge.org/CVCClinicDB/ (request it there); pass the archive you obtained
  with ``archive=`` (``--archive``), or a URL you trust with ``url=``.

A download goes to ``<name>.part`` and resumes with an HTTP Range request when run again. The SHA-256
is checked when known (``sha256=`` or the table below); a mismatching file is deleted, never kept as
the archive. Extraction checks every entry first and refuses the whole archive if one would land
outside the target folder (``../``, absolute paths, drive letters) or is a link or device. The unpacked
dataset then gets the full integrity check.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from resunetpp.data.check import CheckReport
from resunetpp.data.load import check_dataset
from resunetpp.progress import progress_bar

# sha256 None: not published by the dataset authors and not verified here; pass --sha256 to pin one
DATASETS = {
    "kvasir-seg": {"url": "https://datasets.simula.no/downloads/kvasir-seg.zip", "sha256": None,
                   "filename": "kvasir-seg.zip"},
    "cvc-clinicdb": {"url": None, "sha256": None, "filename": "cvc-clinicdb.zip",
                     "where": "https://polyp.grand-challenge.org/CVCClinicDB/ (request the data from its authors)"},
}
CHUNK = 1 << 20


class DownloadError(OSError):
    pass


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, expected: str | None, source: str) -> None:
    if not expected:
        return
    got = sha256_of(path)
    if got.lower() != expected.lower():
        path.unlink()
        raise DownloadError(f"{source}: SHA-256 mismatch: expected {expected.lower()}, got {got}; the file was "
                            "deleted. Check the URL / archive, or the expected sha256.")


def fetch(url: str, dest: str | os.PathLike, sha256: str | None = None, progress: bool = True,
          timeout: float = 60.0) -> Path:
    """Download `url` to `dest` through ``dest.part``, resuming a partial file; verify `sha256` if given."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        if not sha256 or sha256_of(dest).lower() == sha256.lower():
            return dest  # already downloaded
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "resunetpp-downloader"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range past the end: the partial file is already complete
            resp = None
        else:
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"{url}: cannot download ({getattr(e, 'reason', e)})") from None
    if resp is not None:
        with resp:
            if have and resp.status == 206:
                m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != have:
                    raise DownloadError(f"{url}: server answered the range request with "
                                        f"{resp.headers.get('Content-Range')!r}; delete {part} and retry")
                mode = "ab"
            else:
                have, mode = 0, "wb"  # no range support: start over
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            bar = None
            if progress:
                bar = progress_bar(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                   desc=dest.name)
            try:
                with open(part, mode) as f:
                    for block in iter(lambda: resp.read(CHUNK), b""):
                        f.write(block)
                        if bar is not None:
                            bar.update(len(block))
            except (OSError, http.client.HTTPException) as e:
                raise DownloadError(f"{url}: download interrupted ({e}); run again to resume from {part}") from None
            finally:
                if bar is not None:
                    bar.close()
            if total is not None and part.stat().st_size != total:
                raise DownloadError(f"{url}: got {part.stat().st_size:,} of {total:,} bytes; run again to resume "
                                    f"from {part}")
    _verify(part, sha256, url)
    os.replace(part, dest)
    return dest


def _check_member(name: str, archive: Path) -> PurePosixPath:
    norm = name.replace("\\", "/")
    pure = PurePosixPath(norm)
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise DownloadError(f"{archive}: refusing to extract absolute path {name!r}")
    if ".." in pure.parts:
        raise DownloadError(f"{archive}: refusing to extract {name!r}: it escapes the target folder")
    return pure


def safe_extract(archive: str | os.PathLike, to: str | os.PathLike) -> list[Path]:
    """Unpack a .zip or .tar(.gz/.bz2/.xz) into `to`, refusing it whole if any entry is unsafe."""
    archive, to = Path(archive), Path(to)
    base = to.resolve()
    written: list[Path] = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                pure = _check_member(info.filename, archive)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise DownloadError(f"{archive}: refusing to extract symbolic link {info.filename!r}")
                if not (base / pure).resolve().is_relative_to(base):
                    raise DownloadError(f"{archive}: refusing to extract {info.filename!r}: it escapes {to}")
            base.mkdir(parents=True, exist_ok=True)
            for info in infos:
                target = base / PurePosixPath(info.filename.replace("\\", "/"))
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                written.append(target)
        return written
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                _check_member(m.name, archive)
                if not (m.isfile() or m.isdir()):
                    raise DownloadError(f"{archive}: refusing to extract {m.name!r}: links and devices are not allowed")
            base.mkdir(parents=True, exist_ok=True)
            tf.extractall(base, filter="data")
            written = [base / m.name for m in members if m.isfile()]
        return written
    raise DownloadError(f"{archive}: not a zip or tar archive")


def download_dataset(name: str, to: str | os.PathLike, url: str | None = None, archive: str | os.PathLike | None = None,
                     sha256: str | None = None, progress: bool = True) -> tuple[Path, CheckReport]:
    """Fetch (or take the local `archive`), verify, unpack into `to`, then check; returns (dataset folder, report)."""
    key = name.lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    info = DATASETS[key]
    to = Path(to)
    expected = sha256 or (info["sha256"] if url is None else None)
    if archive is not None:
        archive = Path(archive)
        if not archive.is_file():
            raise FileNotFoundError(f"{archive}: archive not found")
        got = sha256_of(archive) if expected else None
        if got is not None and got != expected.lower():
            raise DownloadError(f"{archive}: SHA-256 mismatch: expected {expected.lower()}, got {got}")
    else:
        url = url or info["url"]
        if url is None:
            raise ValueError(f"{name} has no public direct download; get it from {info['where']} and give "
                             "the downloaded archive (or a url)")
        archive = fetch(url, to / info["filename"], sha256=expected, progress=progress)
    safe_extract(archive, to)
    report = check_dataset(to, layout=key, progress=progress)
    return report.root, report
