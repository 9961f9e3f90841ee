"""Download AlphaFold DB models for a list of UniProt ids: concurrent, retried, resumable, atomic.

    python tools/fetch_alphafold.py IDS_FILE --out DIR [--base-url URL] [--version 4] [--format pdb|cif]
                                    [--workers 8] [--retries 4] [--timeout-s 30] [--backoff-s 0.5]

IDS_FILE is detected by content: the DeepTMHMM partitions JSON, a 3-line file (`>ID|TYPE` headers), or
one id per line (blank lines and `#` comments ignored). Each model is written to `<name>.part` and renamed
only once complete, so a file under its final name is always whole and a re-run skips it; a left-over
`.part` is resumed with an HTTP Range request where the server allows it. Exit code 0 when every id was
downloaded, already present or not in the database (those are listed in `<out>/not_found.txt`); 1 when
some failed after all retries.

`download()` is the one download implementation; tools/fetch_deeptmhmm.py imports it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_BASE_URL = "https://alphafold.ebi.ac.uk/files"
USER_AGENT = "protopo_ray-fetch/0.1"
CHUNK_SIZE = 1 << 16
# Ids become URL path segments and file names: allow UniProt accessions (and isoform suffixes), nothing else.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class VerifyError(Exception):
    """A completely received file failed a content check (bad JSON, wrong sha256); retrying will not help."""


@dataclass(frozen=True, slots=True)
class DownloadResult:
    """Outcome of one `download()` call."""

    status: str
    """'downloaded', 'skipped' (already complete), 'not_found' (HTTP 404/410) or 'failed'."""
    url: str
    path: Path
    num_bytes: int = 0
    num_attempts: int = 0
    error: str = ""
    """Last error for 'failed'; empty otherwise."""


@dataclass(slots=True)
class FetchReport:
    """What `fetch_many()` did, id by id."""

    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """id -> last error."""

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        lines = [
            f"downloaded {len(self.downloaded)}, skipped (existing) {len(self.skipped)}, "
            f"not found {len(self.not_found)}, failed {len(self.failed)}"
        ]
        if self.not_found:
            lines.append("not found: " + " ".join(self.not_found))
        lines += [f"FAILED {id_}: {error}" for id_, error in self.failed.items()]
        return "\n".join(lines)


class _Retryable(Exception):
    """A transient problem (connection, timeout, 5xx, truncated body): worth another attempt."""


def _expected_total(response: http.client.HTTPResponse, offset: int) -> int | None:
    length = response.headers.get("Content-Length")
    return offset + int(length) if length is not None and length.isdigit() else None


def _attempt(url: str, part: Path, timeout_s: float) -> int | None:
    """One GET into `part`, resuming from its current size. Returns the body size, or None for 404/410."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    # A fresh opener per attempt: proxy settings are read from the environment now, not at import.
    opener = urllib.request.build_opener()
    try:
        response = opener.open(request, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code in (404, 410):
            return None
        if e.code == 416:  # our .part is not a prefix the server recognises: start over
            part.unlink(missing_ok=True)
            raise _Retryable(f"HTTP 416 resuming at byte {offset}; restarting from 0") from e
        if e.code >= 500 or e.code == 429:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from e
        raise  # other 4xx: a wrong URL, not a transient problem
    except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets are all OSError
        raise _Retryable(f"{type(e).__name__}: {e}") from e
    with response:
        if response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                part.unlink(missing_ok=True)
                raise _Retryable(f"server resumed at the wrong offset ({content_range!r}, wanted {offset})")
            mode = "ab"
        else:  # 200: the server ignored Range, the body is the whole file
            offset, mode = 0, "wb"
        expected = _expected_total(response, offset)
        received = offset
        try:
            with open(part, mode) as f:
                while chunk := response.read(CHUNK_SIZE):
                    f.write(chunk)
                    received += len(chunk)
        except (OSError, http.client.HTTPException) as e:
            raise _Retryable(f"connection lost after {received} bytes: {type(e).__name__}: {e}") from e
    # http.client returns a short body without complaint when the peer closes early; Content-Length tells.
    if expected is not None and received != expected:
        raise _Retryable(f"truncated body: got {received} of {expected} bytes")
    return received


def download(
    url: str,
    dest: Path,
    *,
    retries: int = 4,
    timeout_s: float = 30.0,
    backoff_s: float = 0.5,
    verify: Callable[[Path], None] | None = None,
) -> DownloadResult:
    """Fetch `url` to `dest` atomically (via `dest.part`), with up to `retries` retries after the first try.

    Retries (exponential backoff `backoff_s * 2**k`, jittered) cover connection errors, timeouts, HTTP 5xx/429
    and bodies shorter than their Content-Length. 404/410 return 'not_found' at once; other 4xx fail at once.
    An existing `dest` is skipped (checked with `verify` if given). `verify(part)` runs on the complete body
    before the rename and raises VerifyError to reject it; a rejected body is deleted and not retried.
    """
    dest = Path(dest)
    if dest.exists():
        if verify is not None:
            try:
                verify(dest)
            except VerifyError as e:
                return DownloadResult("failed", url, dest, error=f"existing {dest} fails its check ({e}); "
                                      "delete it to download again")
        return DownloadResult("skipped", url, dest, num_bytes=dest.stat().st_size)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    error = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1) * random.uniform(1.0, 1.5))
        try:
            num_bytes = _attempt(url, part, timeout_s)
        except _Retryable as e:
            error = str(e)
            continue
        except urllib.error.HTTPError as e:
            return DownloadResult("failed", url, dest, num_attempts=attempt + 1, error=f"HTTP {e.code} {e.reason}")
        if num_bytes is None:
            part.unlink(missing_ok=True)
            return DownloadResult("not_found", url, dest, num_attempts=attempt + 1)
        if verify is not None:
            try:
                verify(part)
            except VerifyError as e:
                part.unlink(missing_ok=True)
                return DownloadResult("failed", url, dest, num_bytes, attempt + 1, f"{url}: {e}")
        os.replace(part, dest)
        return DownloadResult("downloaded", url, dest, num_bytes, attempt + 1)
    # The .part stays: a later run resumes from it.
    return DownloadResult("failed", url, dest, num_attempts=retries + 1,
                          error=f"{url}: {error} (gave up after {retries + 1} attempts)")


def read_ids(path: Path) -> list[str]:
    """UniProt ids from a partitions JSON, a 3-line file or a plain list, in file order, duplicates dropped."""
    path = Path(path)
    text = path.read_text()
    stripped = text.lstrip()
    found: list[tuple[str, str]] = []  # (id, where) for error messages
    if stripped.startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: looks like JSON but does not parse: {e.msg}") from e
        groups = data.items() if isinstance(data, dict) else [("", data)]
        for name, records in groups:
            if not isinstance(records, list):
                raise ValueError(f"{path}: $.{name} is not a list of records")
            for i, record in enumerate(records):
                id_ = record.get("id") if isinstance(record, dict) else record
                if not isinstance(id_, str):
                    raise ValueError(f"{path}: $.{name}[{i}] has no string 'id'")
                found.append((id_.strip(), f"{path}:$.{name}[{i}]"))
    elif stripped.startswith(">"):
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.startswith(">"):
                found.append((line[1:].split("|")[0].strip(), f"{path}:{line_no}"))
    else:
        for line_no, line in enumerate(text.splitlines(), 1):
            id_ = line.split("#", 1)[0].strip()
            if id_:
                found.append((id_, f"{path}:{line_no}"))
    ids: dict[str, None] = {}
    for id_, where in found:
        if not ID_PATTERN.fullmatch(id_):
            raise ValueError(f"{where}: {id_!r} is not a UniProt id (letters, digits, '_', '.', '-' only)")
        ids.setdefault(id_)
    return list(ids)


def model_name(id_: str, version: int = 4, fmt: str = "pdb") -> str:
    return f"AF-{id_}-F1-model_v{version}.{fmt}"


def fetch_many(
    ids: Iterable[str],
    out: Path,
    base_url: str = DEFAULT_BASE_URL,
    *,
    version: int = 4,
    fmt: str = "pdb",
    num_workers: int = 8,
    retries: int = 4,
    timeout_s: float = 30.0,
    backoff_s: float = 0.5,
    log: Callable[[str], None] | None = None,
) -> FetchReport:
    """Download the AlphaFold model of every id into `out`; writes `out/not_found.txt`. Never raises per id."""
    if fmt not in ("pdb", "cif"):
        raise ValueError(f"fmt must be 'pdb' or 'cif', got {fmt!r}")
    if num_workers < 1 or retries < 0 or timeout_s <= 0 or backoff_s < 0:
        raise ValueError("need num_workers >= 1, retries >= 0, timeout_s > 0, backoff_s >= 0")
    ids = list(dict.fromkeys(ids))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_url = base_url.rstrip("/")
    results: dict[str, DownloadResult] = {}
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        futures = {
            pool.submit(download, f"{base_url}/{model_name(id_, version, fmt)}", out / model_name(id_, version, fmt),
                        retries=retries, timeout_s=timeout_s, backoff_s=backoff_s): id_
            for id_ in ids
        }
        for num_done, future in enumerate(as_completed(futures), 1):
            id_ = futures[future]
            results[id_] = result = future.result()
            if log is not None and (result.status == "failed" or num_done % 100 == 0 or num_done == len(ids)):
                log(f"[{num_done}/{len(ids)}] {id_}: {result.status} {result.error}".rstrip())
    report = FetchReport()
    for id_ in ids:  # report in input order, not completion order
        result = results[id_]
        if result.status == "failed":
            report.failed[id_] = result.error
        else:
            getattr(report, result.status).append(id_)
    # Always rewritten, so a stale list from an earlier run never survives.
    (out / "not_found.txt").write_text("".join(f"{id_}\n" for id_ in report.not_found))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ids_file", type=Path, help="ids: one per line, a DeepTMHMM 3-line file or partitions JSON")
    parser.add_argument("--out", type=Path, required=True, help="directory for the models")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"default {DEFAULT_BASE_URL}")
    parser.add_argument("--version", type=int, default=4, help="AlphaFold DB model version (default 4)")
    parser.add_argument("--format", choices=("pdb", "cif"), default="pdb")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--retries", type=int, default=4, help="retries after the first attempt (default 4)")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="per-request socket timeout")
    parser.add_argument("--backoff-s", type=float, default=0.5, help="first retry delay; doubles each retry")
    args = parser.parse_args(argv)
    try:
        ids = read_ids(args.ids_file)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    log(f"{len(ids)} ids from {args.ids_file} -> {args.out}")
    try:
        report = fetch_many(ids, args.out, args.base_url, version=args.version, fmt=args.format,
                            num_workers=args.workers, retries=args.retries, timeout_s=args.timeout_s,
                            backoff_s=args.backoff_s, log=log)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    if report.not_found:
        print(f"not-found ids written to {args.out / 'not_found.txt'}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
