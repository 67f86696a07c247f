"""download.py against a tiny HTTP server on 127.0.0.1 (Range support, faults on demand); no network."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import tarfile
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

from moecl.data import download as dl
from moecl.data.registry import RemoteFile, get_dataset, open_split


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves files of `server.folder`; honours `Range: bytes=N-` unless `server.ignore_range`; with
    `server.drop_after = n` it announces the full length but closes after n bytes (a dropped connection)."""

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802 (http.server API)
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        path = server.folder / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng and not server.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0]) + server.range_shift
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", server.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.drop_after is not None:
            self.wfile.write(body[: server.drop_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.folder = folder
    httpd.requests = []
    httpd.ignore_range = False
    httpd.drop_after = None
    httpd.range_shift = 0  # a buggy server answering a Range request from the wrong offset
    httpd.content_type = "application/octet-stream"
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _payload(n: int = 300_000) -> bytes:
    return np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()


def _spec(server, name: str, data: bytes, **kw) -> RemoteFile:
    (server.folder / name).write_bytes(data)
    fields = dict(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    fields.update(kw)
    return RemoteFile(name, (server.url + name,), **fields)


def test_fetch_downloads_verifies_and_renames_atomically(server, tmp_path):
    data = _payload()
    spec = _spec(server, "blob.bin", data)
    out = dl.fetch(spec, tmp_path / "dest", progress=False)
    assert out == tmp_path / "dest" / "blob.bin"
    assert out.read_bytes() == data
    assert not (tmp_path / "dest" / "blob.bin.part").exists()
    # a second call finds the verified file and makes no request
    before = len(server.requests)
    dl.fetch(spec, tmp_path / "dest", progress=False)
    assert len(server.requests) == before


def test_fetch_resumes_a_truncated_part_with_range(server, tmp_path):
    data = _payload()
    spec = _spec(server, "blob.bin", data)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "blob.bin.part").write_bytes(data[:123_456])
    dl.fetch(spec, dest, progress=False)
    assert (dest / "blob.bin").read_bytes() == data
    assert server.requests[-1] == ("/blob.bin", "bytes=123456-")


def test_fetch_restarts_when_server_ignores_range(server, tmp_path):
    data = _payload()
    spec = _spec(server, "blob.bin", data)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "blob.bin.part").write_bytes(b"x" * 1000)  # wrong bytes: would corrupt the file if appended to
    server.ignore_range = True
    dl.fetch(spec, dest, progress=False)
    assert (dest / "blob.bin").read_bytes() == data


def test_partial_response_from_the_wrong_offset_is_discarded(server, tmp_path):
    data = _payload()
    spec = _spec(server, "blob.bin", data)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "blob.bin.part").write_bytes(data[:5000])
    server.range_shift = 10
    with pytest.raises(dl.DownloadError, match="unexpected partial response"):
        dl.fetch(spec, dest, progress=False)
    assert not (dest / "blob.bin.part").exists() and not (dest / "blob.bin").exists()
    server.range_shift = 0
    assert dl.fetch(spec, dest, progress=False).read_bytes() == data


def test_dropped_connection_keeps_part_then_resumes(server, tmp_path):
    data = _payload()
    spec = _spec(server, "blob.bin", data)
    dest = tmp_path / "dest"
    server.drop_after = 100_000
    with pytest.raises(dl.DownloadError, match="resume"):
        dl.fetch(spec, dest, progress=False)
    assert not (dest / "blob.bin").exists()  # atomic: no final file from a failed download
    assert (dest / "blob.bin.part").stat().st_size == 100_000
    server.drop_after = None
    dl.fetch(spec, dest, progress=False)
    assert (dest / "blob.bin").read_bytes() == data
    assert server.requests[-1][1] == "bytes=100000-"


def test_checksum_mismatch_deletes_part_and_explains(server, tmp_path):
    data = _payload()
    spec = _spec(server, "blob.bin", data, sha256="0" * 64)
    dest = tmp_path / "dest"
    with pytest.raises(dl.ChecksumError, match="sha256") as info:
        dl.fetch(spec, dest, progress=False)
    assert "blob.bin" in str(info.value)
    assert not (dest / "blob.bin").exists()
    assert not (dest / "blob.bin.part").exists()


def test_md5_and_size_are_used_when_no_sha256(server, tmp_path):
    data = _payload(50_000)
    good = _spec(server, "a.bin", data, sha256=None, md5=hashlib.md5(data).hexdigest())
    assert dl.fetch(good, tmp_path / "d1", progress=False).read_bytes() == data
    bad_size = _spec(server, "b.bin", data, sha256=None, size=len(data) + 1)
    with pytest.raises(dl.ChecksumError, match="size"):
        dl.fetch(bad_size, tmp_path / "d2", progress=False)
    assert not (tmp_path / "d2" / "b.bin").exists()


def test_mirror_fallback_and_html_pages_rejected(server, tmp_path):
    data = _payload(10_000)
    spec = _spec(server, "blob.bin", data)
    spec = dataclasses.replace(spec, urls=(server.url + "missing.bin", server.url + "blob.bin"))
    assert dl.fetch(spec, tmp_path / "d1", progress=False).read_bytes() == data
    server.content_type = "text/html; charset=utf-8"
    with pytest.raises(dl.DownloadError, match="HTML page"):
        dl.fetch(dataclasses.replace(spec, urls=(server.url + "blob.bin",)), tmp_path / "d2", progress=False)
    assert not (tmp_path / "d2" / "blob.bin").exists()


def test_existing_mismatching_file_is_reported_not_overwritten(server, tmp_path):
    data = _payload(10_000)
    spec = _spec(server, "blob.bin", data)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "blob.bin").write_bytes(b"not it")
    with pytest.raises(dl.ChecksumError, match="delete it"):
        dl.fetch(spec, dest, progress=False)
    assert (dest / "blob.bin").read_bytes() == b"not it"


def _cifar10_tar(n_per_batch: int = 10) -> bytes:
    """A tiny cifar-10-binary.tar.gz: 5 train batches + test batch of `n_per_batch` records, labels i % 10."""
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:

        def add(name: str, payload: bytes) -> None:
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        names = "airplane automobile bird cat deer dog frog horse ship truck".split()
        add("batches.meta.txt", ("\n".join(names) + "\n\n").encode())
        for fname in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            labels = np.arange(n_per_batch, dtype=np.uint8)[:, None] % 10
            pixels = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            add(fname, np.concatenate([labels, pixels], axis=1).tobytes())
    return buf.getvalue()


def test_download_fetches_extracts_and_opens_official_layout(server, tmp_path):
    archive = _cifar10_tar()
    spec = _spec(server, "cifar-10-binary.tar.gz", archive, extract=True)
    info = dataclasses.replace(get_dataset("cifar10"), files=(spec,))
    root = tmp_path / "data"
    target = dl.download(info, root, progress=False)
    assert target == root / "cifar10"
    assert (target / "cifar-10-batches-bin" / "test_batch.bin").is_file()
    assert not any(p.name.startswith(".extract-") for p in target.iterdir())  # temp folder cleaned up
    train = open_split("cifar10", root, "train")
    assert len(train) == 50 and train.classnames[0] == "airplane"
    # rerun: nothing fetched again, nothing re-extracted
    before = len(server.requests)
    dl.download(info, root, progress=False)
    assert len(server.requests) == before
    report = dl.verify(info, root)
    assert report["ok"], report["problems"]
    assert report["layout"] == "official"
    assert report["files"][0]["sha256_ok"] is True and report["files"][0]["extracted"] is True
    assert report["splits"]["train"]["images"] == 50 and report["splits"]["test"]["bad"] == 0


def test_download_without_keeping_archives(server, tmp_path):
    spec = _spec(server, "cifar-10-binary.tar.gz", _cifar10_tar(), extract=True)
    info = dataclasses.replace(get_dataset("cifar10"), files=(spec,))
    target = dl.download(info, tmp_path, progress=False, keep_archives=False)
    assert not (target / "cifar-10-binary.tar.gz").exists()
    before = len(server.requests)
    dl.download(info, tmp_path, progress=False, keep_archives=False)  # extraction marker: no refetch
    assert len(server.requests) == before


def test_known_gone_or_gated_sources_explain_what_to_do(tmp_path):
    with pytest.raises(dl.DownloadError) as info:
        dl.download("stanford_cars", tmp_path, progress=False)
    message = str(info.value)
    assert "tanganke/stanford_cars" in message and str(tmp_path / "stanford_cars") in message
    with pytest.raises(dl.DownloadError, match="image-net.org"):
        dl.download("imagenet", tmp_path, progress=False)


def test_extract_refuses_paths_outside_the_target(tmp_path):
    evil_zip = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil_zip, "w") as z:
        z.writestr("../escaped.txt", "x")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(dl.DownloadError, match="outside"):
        dl.extract(evil_zip, dest)
    evil_tar = tmp_path / "evil.tar"
    with tarfile.open(evil_tar, "w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(dl.DownloadError, match="cannot unpack"):
        dl.extract(evil_tar, dest)
    assert not (tmp_path / "escaped.txt").exists()
    assert list(dest.iterdir()) == []  # no temp folders, no markers left behind


def _png(color: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (color, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def test_verify_offline_zip_against_manifest_and_reports_bad_images(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    zpath = root / "clothing.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for split, n in (("train", 3), ("test", 2)):
            for cls in ("dress", "hat"):
                for i in range(n):
                    z.writestr(f"{split}/{cls}/{i}.png", _png(i * 40))
        z.writestr("test/hat/broken.png", b"\x89PNG not really")
    sha = hashlib.sha256(zpath.read_bytes()).hexdigest()
    (root / "MANIFEST.json").write_text(
        json.dumps({"datasets": {"clothing": {"file": "clothing.zip", "sha256": sha, "bytes": zpath.stat().st_size}}})
    )
    report = dl.verify("clothing", root)
    assert report["layout"] == "zip" and report["files"][0]["sha256_ok"] is True
    assert report["splits"]["train"] == {
        "images": 6,
        "classes": 2,
        "class_counts": {"dress": 3, "hat": 3},
        "empty_classes": [],
        "checked": 6,
        "bad": 0,
        "first_bad": [],
    }
    assert report["splits"]["test"]["bad"] == 1
    assert "broken.png" in report["splits"]["test"]["first_bad"][0]
    assert not report["ok"] and any("unreadable" in p for p in report["problems"])
    json.dumps(report)  # the CLI prints it as JSON

    (root / "MANIFEST.json").write_text(
        json.dumps({"datasets": {"clothing": {"file": "clothing.zip", "sha256": "f" * 64}}})
    )
    report = dl.verify("clothing", root, decode=False)
    assert report["files"][0]["sha256_ok"] is False and any("sha256" in p for p in report["problems"])


def test_verify_missing_dataset_says_how_to_get_it(tmp_path):
    report = dl.verify("dtd", tmp_path)
    assert report["ok"] is False and report["layout"] is None
    assert f"moecl data download dtd --root {tmp_path}" in report["problems"][0]
