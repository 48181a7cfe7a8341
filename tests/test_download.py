"""The downloader against a local http.server (127.0.0.1 only) that speaks HTTP Range, like SNAP's server."""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from tests.conftest import synthetic_rows

runner = CliRunner()


class RangeHandler(SimpleHTTPRequestHandler):
    ranges: ClassVar[list[str]] = []
    cut_after: int | None = None  # break the connection after this many bytes (once)

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        header = self.headers.get("Range")
        if header:
            RangeHandler.ranges.append(header)
            start = int(header.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if RangeHandler.cut_after is not None:
            body, RangeHandler.cut_after = body[: RangeHandler.cut_after], None
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    inter, items = synthetic_rows()
    reviews = "".join(json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t}) + "\n" for u, i, t in inter)
    meta = "".join(repr({"asin": i, "title": t}) + "\n" for i, t in items)
    (root / "reviews_Beauty_5.json.gz").write_bytes(gzip.compress(reviews.encode() * 20))
    (root / "meta_Beauty.json.gz").write_bytes(gzip.compress(meta.encode()))
    RangeHandler.ranges = []

    def handler(*args, **kwargs):  # type: ignore[no-untyped-def]
        return RangeHandler(*args, directory=str(root), **kwargs)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    httpd.shutdown()
    httpd.server_close()


def _cache(tmp_path: Path) -> Path:
    return tmp_path / "home" / "downloads" / "amazon2014" / "beauty"


def test_download_records_url_and_sha256(server, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    url, root = server
    monkeypatch.setenv("GLOSS_AMAZON_URL", url)
    result = runner.invoke(app, ["data", "-p", "p", "-q", "--json"])
    assert result.exit_code == 0, result.output
    stage = json.loads(Path("p/manifest.json").read_text())["stages"]["data"]
    assert stage["params"]["source"] == {"kind": "original", "origin": "download"}
    reviews = next(e for e in stage["inputs"] if e["role"] == "interactions")
    assert reviews["url"] == url + "reviews_Beauty_5.json.gz"
    assert reviews["sha256"] == hashlib.sha256((root / "reviews_Beauty_5.json.gz").read_bytes()).hexdigest()
    assert not list(_cache(tmp_path).glob("*.part"))


def test_partial_download_resumes_with_a_range_request(server, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    url, root = server
    monkeypatch.setenv("GLOSS_AMAZON_URL", url)
    full = (root / "reviews_Beauty_5.json.gz").read_bytes()
    _cache(tmp_path).mkdir(parents=True)
    (_cache(tmp_path) / "reviews_Beauty_5.json.gz.part").write_bytes(full[:1000])
    assert runner.invoke(app, ["data", "-p", "p", "-q"]).exit_code == 0
    assert RangeHandler.ranges == ["bytes=1000-"]
    assert (_cache(tmp_path) / "reviews_Beauty_5.json.gz").read_bytes() == full


def test_broken_download_fails_cleanly_then_resumes(server, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    url, root = server
    monkeypatch.setenv("GLOSS_AMAZON_URL", url)
    RangeHandler.cut_after = 700
    first = runner.invoke(app, ["data", "-p", "p"])
    assert first.exit_code == 1 and "ended early" in first.stderr and "resumes" in first.stderr
    assert not Path("p/manifest.json").exists()
    assert (_cache(tmp_path) / "reviews_Beauty_5.json.gz.part").stat().st_size == 700
    assert runner.invoke(app, ["data", "-p", "p", "-q"]).exit_code == 0
    assert RangeHandler.ranges == ["bytes=700-"]
    full = (root / "reviews_Beauty_5.json.gz").read_bytes()
    assert (_cache(tmp_path) / "reviews_Beauty_5.json.gz").read_bytes() == full


def test_unreachable_server_is_one_line(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("GLOSS_AMAZON_URL", "http://127.0.0.1:9/")
    result = runner.invoke(app, ["data", "-p", "p"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: Could not download http://127.0.0.1:9/reviews_Beauty_5.json.gz")
    assert "GLOSS_DATA_DIR" in result.stderr


# -- Amazon Reviews 2023 ----------------------------------------------------------------------------------
@pytest.fixture
def server2023(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """The lab's layout: raw/review_categories, raw/meta_categories and benchmark/5core/<variant>/, gzipped."""
    from tests.amazon2023 import (
        CATEGORY,
        benchmark_splits,
        reviews_and_meta,
        spread_over_cutoffs,
        timestamp_splits,
        write_benchmark,
        write_jsonl,
    )

    root = tmp_path / "www2023"
    reviews, meta = reviews_and_meta()
    write_jsonl(root / "raw/review_categories" / f"{CATEGORY}.jsonl.gz", reviews * 3)
    write_jsonl(root / "raw/meta_categories" / f"meta_{CATEGORY}.jsonl.gz", meta)
    write_benchmark(root / "benchmark/5core/last_out_w_his", benchmark_splits(reviews), history=True, header=True)
    spread = timestamp_splits(spread_over_cutoffs(reviews))
    write_benchmark(root / "benchmark/5core/timestamp", spread, history=False, header=False)
    RangeHandler.ranges = []

    def handler(*args, **kwargs):  # type: ignore[no-untyped-def]
        return RangeHandler(*args, directory=str(root), **kwargs)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    monkeypatch.setenv("GLOSS_AMAZON2023_URL", url)
    yield url, root
    httpd.shutdown()
    httpd.server_close()


def _cache2023(tmp_path: Path) -> Path:
    return tmp_path / "home" / "downloads" / "amazon2023" / "All_Beauty"


def test_amazon2023_download_resumes_and_records_sha256(server2023, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, root = server2023
    name = "raw/review_categories/All_Beauty.jsonl.gz"
    full = (root / name).read_bytes()
    (_cache2023(tmp_path) / name).parent.mkdir(parents=True)
    (_cache2023(tmp_path) / (name + ".part")).write_bytes(full[:900])
    result = runner.invoke(app, ["data", "-d", "amazon2023/All_Beauty", "-p", "p", "-q", "--json"])
    assert result.exit_code == 0, result.output
    assert RangeHandler.ranges == ["bytes=900-"]
    assert (_cache2023(tmp_path) / name).read_bytes() == full
    stage = json.loads(Path("p/manifest.json").read_text())["stages"]["data"]
    assert stage["params"]["source"] == {"kind": "amazon2023", "origin": "download"}
    reviews = next(e for e in stage["inputs"] if e["role"] == "interactions")
    assert reviews["url"] == url + name and reviews["sha256"] == hashlib.sha256(full).hexdigest()


def test_amazon2023_benchmark_download_fails_cleanly_then_resumes(server2023, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, root = server2023
    args = ["data", "-d", "amazon2023/All_Beauty", "--benchmark", "last_out_w_his", "-p", "p", "-q"]
    RangeHandler.cut_after = 100  # the first file (meta) breaks off
    first = runner.invoke(app, args)
    assert first.exit_code == 1 and "ended early" in first.stderr and not Path("p/manifest.json").exists()
    assert runner.invoke(app, args).exit_code == 0
    assert RangeHandler.ranges == ["bytes=100-"]
    stage = json.loads(Path("p/manifest.json").read_text())["stages"]["data"]
    inputs = {e["role"]: e for e in stage["inputs"]}
    assert inputs["test"]["url"] == url + "benchmark/5core/last_out_w_his/All_Beauty.test.csv.gz"
    for role in ("train", "valid", "test", "items"):
        path = root / inputs[role]["url"].removeprefix(url)
        assert inputs[role]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not list(_cache2023(tmp_path).rglob("*.part"))


def test_amazon2023_timestamp_benchmark_downloads_its_own_folder(server2023, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, root = server2023
    result = runner.invoke(
        app, ["data", "-d", "amazon2023/All_Beauty", "--benchmark", "timestamp", "-p", "p", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert "scores each user's first test and first valid row only" in result.stderr
    stage = json.loads(Path("p/manifest.json").read_text())["stages"]["data"]
    inputs = {e["role"]: e for e in stage["inputs"]}
    for split in ("train", "valid", "test"):
        name = f"benchmark/5core/timestamp/All_Beauty.{split}.csv.gz"
        assert inputs[split]["url"] == url + name
        assert inputs[split]["sha256"] == hashlib.sha256((root / name).read_bytes()).hexdigest()
    assert stage["metrics"]["benchmark"]["test"]["later_rows"] > 0
