"""Download the DeepTMHMM data set files (by default the partitions JSON from the NMTMNet repository).

    python tools/fetch_deeptmhmm.py --out DIR [--base-url URL] [--files NAME ...] [--sha256 [NAME=]HEX ...]

Same retry / resume / atomic-rename behaviour as tools/fetch_alphafold.py (it is the same `download()`).
Every `.json` file must parse before it takes its final name; `--sha256` checks a digest the same way. With
the default base URL (NMTMNet pinned at the commit documented in ../shared/data/deeptmhmm/SOURCE.md) the
partitions JSON is checked against its known digest unless `--sha256` says otherwise.
Exit code 0 when every file is present and verified, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

try:
    from tools.fetch_alphafold import DownloadResult, VerifyError, download
except ImportError:  # run as a script (python tools/fetch_deeptmhmm.py): tools/ itself is on sys.path
    from fetch_alphafold import DownloadResult, VerifyError, download

NMTMNET_COMMIT = "1b9ac8bdc675851a83d07d549cf97dd025c4db73"
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/martinaegidius/NMTMNet/{NMTMNET_COMMIT}"
DEFAULT_FILES = ("DeepTMHMM.partitions.json",)
# sha256 of the files at DEFAULT_BASE_URL (checked against the copy in ../shared/data/deeptmhmm).
KNOWN_SHA256 = {"DeepTMHMM.partitions.json": "a4982d16eaa5408c65a0c2171f97e8fd0f41ff757eb3efc6a2a385e705b6d6f2"}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def make_verifier(name: str, sha256: str | None):
    """A `verify(path)` for download(): JSON must parse (for .json names) and the digest must match (if given)."""

    def verify(path: Path) -> None:
        if sha256 is not None:
            actual = sha256_of(path)
            if actual != sha256.lower():
                raise VerifyError(f"{name}: sha256 {actual} does not match the expected {sha256}")
        if name.endswith(".json"):
            try:
                with open(path, "rb") as f:
                    json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
                raise VerifyError(f"{name} is not valid JSON{where}: {e}; is --base-url pointing at the raw "
                                  "file rather than an HTML page?") from e

    return verify


def parse_sha256_args(values: list[str], files: list[str]) -> dict[str, str]:
    """`--sha256 HEX` (only with a single file) or `--sha256 NAME=HEX` (any number) -> {name: hex}."""
    digests: dict[str, str] = {}
    for value in values:
        name, sep, hex_ = value.rpartition("=")
        if not sep:
            if len(files) != 1:
                raise ValueError(f"--sha256 {value}: with {len(files)} files write NAME=HEX")
            name = files[0]
        if name not in files:
            raise ValueError(f"--sha256 {value}: {name!r} is not among --files {files}")
        if len(hex_) != 64 or any(c not in "0123456789abcdefABCDEF" for c in hex_):
            raise ValueError(f"--sha256 {value}: expected 64 hex digits")
        digests[name] = hex_.lower()
    return digests


def fetch_files(
    out: Path,
    base_url: str = DEFAULT_BASE_URL,
    files: tuple[str, ...] | list[str] = DEFAULT_FILES,
    *,
    sha256: dict[str, str] | None = None,
    retries: int = 4,
    timeout_s: float = 60.0,
    backoff_s: float = 0.5,
) -> list[DownloadResult]:
    """Download each of `files` from `base_url` into `out`, verified; one result per file, in order."""
    out = Path(out)
    base_url = base_url.rstrip("/")
    digests = dict(sha256 or {})
    if base_url == DEFAULT_BASE_URL:
        for name in files:
            digests.setdefault(name, KNOWN_SHA256.get(name))
    return [
        download(f"{base_url}/{name}", out / name, retries=retries, timeout_s=timeout_s, backoff_s=backoff_s,
                 verify=make_verifier(name, digests.get(name)))
        for name in files
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the data files")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"default {DEFAULT_BASE_URL}")
    parser.add_argument("--files", nargs="+", default=list(DEFAULT_FILES), help="file names under --base-url")
    parser.add_argument("--sha256", action="append", default=[], metavar="[NAME=]HEX", help="expected digest")
    parser.add_argument("--retries", type=int, default=4)
    parser.add_argument("--timeout-s", type=float, default=60.0)
    parser.add_argument("--backoff-s", type=float, default=0.5)
    args = parser.parse_args(argv)
    try:
        digests = parse_sha256_args(args.sha256, args.files)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = fetch_files(args.out, args.base_url, args.files, sha256=digests, retries=args.retries,
                          timeout_s=args.timeout_s, backoff_s=args.backoff_s)
    for result in results:
        if result.status in ("downloaded", "skipped"):
            print(f"{result.status} {result.path} ({result.num_bytes} bytes, sha256 {sha256_of(result.path)})")
        elif result.status == "not_found":
            print(f"error: not found (HTTP 404): {result.url}", file=sys.stderr)
        else:
            print(f"error: {result.error}", file=sys.stderr)
    return 0 if all(r.status in ("downloaded", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
