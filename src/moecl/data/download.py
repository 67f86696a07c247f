"""Fetch a dataset's official files (resumable, checksum-verified, atomic) and check a dataset's integrity.

`download(name, root)` puts every file of the registry entry in `<root>/<name>/` and unpacks archives there:
- each file is streamed to `<file>.part`; an existing `.part` is continued with an HTTP Range request;
- the finished `.part` is checked (sha256 when known, else md5, else size) and only then renamed to its final name
  with `os.replace`, so a final file is always complete and verified; a mismatch deletes the `.part`;
- archives are unpacked into a temporary folder inside `<root>/<name>/` and their top-level entries renamed into
  place; a marker `.<archive>.extracted` records a finished extraction so reruns skip it.

`verify(name, root)` reports files present / sizes / checksums and decodes every image of every split.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from moecl.data.folder import DataError, list_splits
from moecl.data.registry import DatasetInfo, RemoteFile, get_dataset, locate, open_split
from moecl.progress import bar as progress_bar

CHUNK = 1 << 20
USER_AGENT = "moecl-data/0.1 (+https://github.com/; python urllib)"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class DownloadError(DataError):
    """A file could not be fetched or unpacked; the message names the file, the URLs tried and what to do."""


class ChecksumError(DownloadError):
    """A downloaded file does not match its recorded size / checksum; the partial file has been deleted."""


# ----------------------------------------------------------------------------------------------------------------
# checksums
# ----------------------------------------------------------------------------------------------------------------
def file_digests(path: Path, algorithms: tuple[str, ...] = ("sha256",)) -> dict[str, str]:
    """Hex digests of `path` for each algorithm, in one pass."""
    hashes = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            for h in hashes.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashes.items()}


def check_file(path: Path, spec: RemoteFile) -> dict[str, Any]:
    """Compare `path` with the recorded size / sha256 / md5 of `spec`.

    Returns {"size", "size_ok", "sha256", "sha256_ok", "md5_ok", "verified_by", "problems"}; *_ok is None when the
    value is not recorded. md5 is only computed when no sha256 is recorded.
    """
    size = path.stat().st_size
    result: dict[str, Any] = {"size": size, "size_ok": None, "sha256": None, "sha256_ok": None, "md5_ok": None}
    problems = []
    if spec.size is not None:
        result["size_ok"] = size == spec.size
        if not result["size_ok"]:
            problems.append(f"size {size} bytes, expected {spec.size}")
    if not problems and (spec.sha256 or spec.md5):  # a wrong size already decides it; skip hashing gigabytes
        algos = ("sha256",) if spec.sha256 else ("sha256", "md5")
        digests = file_digests(path, algos)
        result["sha256"] = digests["sha256"]
        if spec.sha256:
            result["sha256_ok"] = digests["sha256"] == spec.sha256.lower()
            if not result["sha256_ok"]:
                problems.append(f"sha256 {digests['sha256']}, expected {spec.sha256}")
        else:
            result["md5_ok"] = digests["md5"] == spec.md5.lower()
            if not result["md5_ok"]:
                problems.append(f"md5 {digests['md5']}, expected {spec.md5}")
    result["verified_by"] = (
        "sha256" if spec.sha256 else "md5" if spec.md5 else "size" if spec.size is not None else "nothing recorded"
    )
    result["problems"] = problems
    return result


# ----------------------------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------------------------
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError)


def _http_get(url: str, part: Path, spec: RemoteFile, progress: bool, timeout: float) -> None:
    """Stream `url` into `part`, continuing an existing partial file with a Range request when the server allows.

    Leaves `part` in place on a network error so the next attempt resumes; raises on any failure.
    """
    offset = part.stat().st_size if part.exists() else 0
    if spec.size is not None and offset > spec.size:  # stale part of some other file: start over
        part.unlink()
        offset = 0
    if spec.size is not None and offset == spec.size:
        return  # already complete; the caller verifies it
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: the part is (claimed) complete, verify decides
            return
        raise
    with response:
        mode = "wb"
        if response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not (offset and match and int(match.group(1)) == offset):
                part.unlink(missing_ok=True)  # bytes from some other offset: appending would corrupt the file
                raise DownloadError(
                    f"{url}: unexpected partial response ({response.headers.get('Content-Range')!r} for "
                    f"offset {offset}); discarded the partial file, run again to restart"
                )
            mode = "ab"
        else:
            offset = 0  # a full response (the server ignored the Range header): restart from byte 0
        content_type = response.headers.get("Content-Type", "")
        if content_type.startswith("text/html") and not spec.filename.endswith((".html", ".htm")):
            raise DownloadError(
                f"{url} returned an HTML page instead of {spec.filename} (a login, quota or confirmation page?)"
            )
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else spec.size
        with (
            open(part, mode) as out,
            progress_bar(
                total,
                spec.filename,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            while chunk := response.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    got = part.stat().st_size
    if total is not None and got < total:
        raise DownloadError(f"{url}: connection closed after {got} of {total} bytes; run again to resume")


def fetch(spec: RemoteFile, dest_dir: Path, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download one file into `dest_dir` (resuming `<file>.part`), verify it and rename it into place atomically.

    An existing verified final file is kept as is. Mirrors are tried in order; a checksum mismatch deletes the
    partial file and moves on to the next URL. Raises ChecksumError / DownloadError when no URL gives a good file.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / spec.filename
    if final.exists():
        report = check_file(final, spec)
        if not report["problems"]:
            return final
        raise ChecksumError(
            f"{final} exists but does not match the recorded file ({'; '.join(report['problems'])}); delete it and "
            f"run the download again"
        )
    if not spec.urls:
        raise DownloadError(f"{spec.filename}: no download URL is known; place the file in {dest_dir} by hand")
    part = final.with_name(final.name + ".part")
    errors: list[str] = []
    mismatch = False
    for url in spec.urls:
        try:
            _http_get(url, part, spec, progress, timeout)
        except DownloadError as exc:
            errors.append(str(exc))
            continue
        except _NETWORK_ERRORS as exc:
            errors.append(f"{url}: {type(exc).__name__}: {exc}")
            continue
        if not part.exists():
            errors.append(f"{url}: no data received")
            continue
        report = check_file(part, spec)
        if report["problems"]:
            part.unlink()
            mismatch = True
            errors.append(f"{url}: downloaded file does not match ({'; '.join(report['problems'])}); deleted it")
            continue
        os.replace(part, final)
        return final
    details = "\n  ".join(errors)
    if mismatch:
        raise ChecksumError(
            f"{spec.filename}: no source gave the expected file:\n  {details}\nThe source may have changed; "
            f"check the dataset page or download the file by hand into {dest_dir}"
        )
    resume = " (the partial file is kept; run again to resume)" if part.exists() else ""
    raise DownloadError(f"{spec.filename}: download failed{resume}:\n  {details}")


# ----------------------------------------------------------------------------------------------------------------
# archives
# ----------------------------------------------------------------------------------------------------------------
def _marker(archive: Path) -> Path:
    return archive.with_name(f".{archive.name}.extracted")


def _safe_zip_extract(archive: Path, target: Path) -> None:
    base = target.resolve()
    with zipfile.ZipFile(archive) as z:
        for member in z.infolist():
            dest = (target / member.filename).resolve()
            if dest != base and base not in dest.parents:
                raise DownloadError(f"{archive}: member {member.filename!r} would be written outside {target}")
        z.extractall(target)


def extract(archive: Path, dest_dir: Path) -> list[Path]:
    """Unpack a .zip / .tar[.gz|.bz2|.xz] / .tgz into `dest_dir` via a temporary folder, then rename into place.

    Top-level entries that already exist in `dest_dir` are kept (never overwritten). Returns the top-level paths.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_dir))
    try:
        try:
            if zipfile.is_zipfile(archive):
                _safe_zip_extract(archive, tmp)
            elif tarfile.is_tarfile(archive):
                with tarfile.open(archive) as tar:
                    tar.extractall(tmp, filter="data")  # rejects absolute paths, .., links outside, devices
            else:
                raise DownloadError(f"{archive}: not a zip or tar archive; delete it and download it again")
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
            raise DownloadError(
                f"{archive}: cannot unpack ({type(exc).__name__}: {exc}); delete it and download it again"
            ) from exc
        placed = []
        for entry in sorted(tmp.iterdir()):
            target = dest_dir / entry.name
            if not target.exists():
                os.replace(entry, target)
            placed.append(target)
        _marker(archive).write_text(json.dumps({"entries": [p.name for p in placed]}))
        return placed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------
def dataset_dir(name: str, root: Path | str) -> Path:
    return Path(root) / get_dataset(name).name


def download(
    name: str | DatasetInfo,
    root: Path | str,
    progress: bool = True,
    keep_archives: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Fetch and unpack every official file of dataset `name` into `<root>/<name>/`; returns that folder.

    Reruns are cheap: verified files and finished extractions are skipped, partial files resumed. Datasets whose
    source is gone or gated raise DownloadError saying how to get them by hand. `keep_archives=False` deletes each
    archive after a successful extraction (then `verify` can no longer check its checksum).
    """
    info = name if isinstance(name, DatasetInfo) else get_dataset(name)
    target = Path(root) / info.name
    if not info.auto_download:
        raise DownloadError(
            f"dataset '{info.name}' cannot be downloaded automatically: {info.manual_instructions(root)}"
        )
    if not info.files:
        raise DownloadError(f"dataset '{info.name}' has no downloadable files; {info.manual_instructions(root)}")
    target.mkdir(parents=True, exist_ok=True)
    for spec in info.files:
        archive = target / spec.filename
        if spec.extract and _marker(archive).exists() and not archive.exists():
            continue  # extracted earlier and the archive was deleted on purpose
        path = fetch(spec, target, progress=progress, timeout=timeout)
        if spec.extract and not _marker(path).exists():
            extract(path, target)
            if not keep_archives:
                path.unlink()
    return target


def _manifest_entry(zip_path: Path, name: str) -> dict[str, Any] | None:
    """The MANIFEST.json record of an offline zip (../shared/data and the bundled subset ship one)."""
    manifest = zip_path.parent / "MANIFEST.json"
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    datasets = data.get("datasets", data)
    entry = datasets.get(name) if isinstance(datasets, dict) else None
    if isinstance(entry, dict) and entry.get("file", zip_path.name) == zip_path.name:
        return entry
    return None


def _check_images(dataset: Any, max_bad: int, limit: int | None) -> dict[str, Any]:
    bad, first_bad = 0, []
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in range(n):
        source = dataset.items[i][0]
        try:
            source.open()
        except Exception as exc:  # any decode failure counts; the message keeps the reason
            bad += 1
            if len(first_bad) < max_bad:
                first_bad.append(f"{source.key}: {type(exc).__name__}: {exc}")
    return {"checked": n, "bad": bad, "first_bad": first_bad}


def verify(
    name: str | DatasetInfo,
    root: Path | str,
    decode: bool = True,
    max_bad: int = 10,
    max_images_per_split: int | None = None,
) -> dict[str, Any]:
    """Integrity report for `moecl data verify NAME` (JSON-serialisable; "ok" is the overall verdict).

    Files: presence, size, sha256/md5 against the registry (official layout) or MANIFEST.json (offline zips).
    Splits: image and class counts, empty classes, and (decode=True) every image decoded, with the first bad files.
    """
    info = name if isinstance(name, DatasetInfo) else get_dataset(name)
    root = Path(root)
    report: dict[str, Any] = {
        "name": info.name,
        "root": str(root),
        "ok": True,
        "problems": [],
        "files": [],
        "splits": {},
    }
    found = locate(info.name, root)
    if found is None:
        how = (
            f"`moecl data download {info.name} --root {root}`" if info.auto_download else info.manual_instructions(root)
        )
        report.update(ok=False, layout=None, location=None)
        report["problems"].append(f"not found under {root}; get it with {how}")
        return report
    layout, location = found
    report.update(layout=layout, location=str(location))
    report["files"] = _verify_files(info, layout, location, report["problems"])
    splits = list(info.splits) if layout == "official" else list_splits(location)
    for split in splits:
        try:
            dataset = open_split(info.name, root, split)
        except DataError as exc:
            report["problems"].append(f"split '{split}': {exc}")
            continue
        counts = dataset.class_counts()
        entry: dict[str, Any] = {
            "images": len(dataset),
            "classes": len(counts),
            "class_counts": dict(zip(dataset.classnames, counts, strict=True)),
            "empty_classes": [c for c, n in zip(dataset.classnames, counts, strict=True) if n == 0],
        }
        if entry["empty_classes"]:
            report["problems"].append(f"split '{split}': empty classes {entry['empty_classes']}")
        if decode:
            entry.update(_check_images(dataset, max_bad, max_images_per_split))
            if entry["bad"]:
                report["problems"].append(
                    f"split '{split}': {entry['bad']} unreadable images, e.g. {entry['first_bad'][0]}"
                )
        report["splits"][split] = entry
    report["ok"] = not report["problems"]
    return report


def _verify_files(info: DatasetInfo, layout: str, location: Path, problems: list[str]) -> list[dict[str, Any]]:
    if layout == "zip":
        entry = _manifest_entry(location, info.name)
        spec = RemoteFile(location.name, (), sha256=(entry or {}).get("sha256"), size=(entry or {}).get("bytes"))
        result = {"file": str(location), "present": True, **check_file(location, spec)}
        problems.extend(f"{location}: {p}" for p in result.pop("problems"))
        return [result]
    if layout != "official":
        return []
    rows = []
    for spec in info.files:
        path = location / spec.filename
        extracted = _marker(path).exists()
        row: dict[str, Any] = {
            "file": str(path),
            "present": path.exists(),
            "extracted": extracted if spec.extract else None,
        }
        if path.exists():
            row.update(check_file(path, spec))
            problems.extend(f"{path}: {p}" for p in row.pop("problems"))
        rows.append(row)
    return rows
