"""Where a prepared shard set lands: written atomically beside `out` and renamed into place, or resumably.

A local `out` is written into `<out>.tmp-<pid>` beside it and renamed into place only once its manifest is
written, so a crash never leaves a directory that looks complete, and overwriting replaces an existing set only
once the new one is finished; on object storage (no rename) the old manifest goes first and the new one is
written last.

Runs with ESM-2 embeddings (hours for 200,000 proteins) are resumable per shard: the jobs are cut into fixed units
of `RESUME_UNIT` (the same on both builders), each written as its own files `part-<unit>-<n>.parquet` and recorded
by a `ShardLedger` as it finishes, in `<out>.partial` beside `out` (kept when a run fails; `resume.json` there
records the inputs and arguments). Rerunning the same command reuses the finished units; other inputs or
arguments are refused (or, with --overwrite, start over), so shards of two runs never mix.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pyarrow import fs as pafs

from protopo_ray.data import shards, storage


class OutputExists(ValueError):
    """`out` already holds a complete shard set (or other files) and --overwrite was not given."""


def check_out(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse (OutputExists) to write over a complete shard set or a non-empty directory without --overwrite."""
    fs, root = storage.filesystem(str(out))
    if overwrite or fs.get_file_info(root).type == pafs.FileType.NotFound:
        return
    if fs.get_file_info(f"{root}/{shards.MANIFEST}").type == pafs.FileType.File:
        try:
            manifest = shards.read_manifest(out)
        except ValueError:  # unreadable or another schema version: still a set we must not clobber silently
            manifest = {}
        raise OutputExists(f"{out} already holds a complete shard set ({manifest.get('num_proteins', '?')} proteins, "
                           f"written {manifest.get('created_at', '?')}); pass --overwrite to replace it, or choose "
                           f"another --out")
    if fs.get_file_info(root).type != pafs.FileType.Directory or fs.get_file_info(pafs.FileSelector(root)):
        raise OutputExists(f"{out} exists and is not a complete shard set; pass --overwrite to replace it, or "
                           f"choose another --out")


def _remove_stale_temps(out: Path) -> None:
    """Delete `<out>.tmp-<pid>` directories left by killed runs (their process no longer exists)."""
    for tmp in out.parent.glob(f"{out.name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished set `tmp` to `out` (replacing `out` only now)."""
    if out.exists():
        check_out(out, overwrite)  # another run may have finished first
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _write_atomic(write: Callable[[str], dict], out: Path, overwrite: bool) -> dict[str, Any]:
    """`write(dir)` shards into a temp dir beside `out`, then rename it into place (replacing `out` only when
    complete)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        manifest = write(str(tmp))
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def staging_dir(out: str | os.PathLike) -> Path:
    """Where a resumable run keeps its finished shards until the set is complete: `<out>.partial` beside `out`."""
    out = Path(out)
    return out.parent / f"{out.name}.partial"


def _write_resumable(write: Callable[[str], dict], out: Path, overwrite: bool, key: dict[str, Any]) -> dict[str, Any]:
    """`write(dir)` into the staging dir, kept when the run fails so a rerun with the same `key` (inputs and
    arguments) resumes there; renamed into place when complete. A staging dir of another key is refused, or
    discarded with --overwrite."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    staging, key = staging_dir(out), json.loads(json.dumps(key))
    recorded = staging / RESUME_KEY
    if staging.exists():
        made = json.loads(recorded.read_text()) if recorded.is_file() else {}
        if made != key:
            differs = sorted(name for name in key.keys() | made.keys() if made.get(name) != key.get(name))
            message = (f"{staging} holds the finished shards of an interrupted run with other inputs or arguments "
                       f"(differing: {', '.join(differs)})")
            if not overwrite:
                raise OutputExists(f"{message}; rerun that command to finish it, or pass --overwrite to discard "
                                   f"them and start over")
            print(f"{message}: discarding them and starting over (--overwrite)", flush=True)
            shutil.rmtree(staging)
    staging.mkdir(exist_ok=True)
    recorded.write_text(json.dumps(key, indent=2) + "\n")
    manifest = write(str(staging))
    recorded.unlink()
    _move_into_place(staging, out, overwrite)
    return manifest


def write_output(write: Callable[[str], dict], out: str | os.PathLike, overwrite: bool,
                 resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run `write(target)` for `out`: atomically via a temp dir when local (via the resumable staging dir when
    `resume`, the inputs and arguments that make the set, is given); on object storage straight into `out` after
    deleting an old set's manifest (first) and part files, the new manifest written last."""
    if not storage.is_uri(out):
        if resume is not None:
            return _write_resumable(write, Path(out), overwrite, resume)
        return _write_atomic(write, Path(out), overwrite)
    check_out(out, overwrite)
    shards.clear_shards(*storage.filesystem(str(out)))
    return write(str(out))


# ------------------------------------------------------------------------------------- resumable runs


RESUME_UNIT = shards.MAX_ROWS_PER_FILE
"""Jobs per resumable shard unit (embedding runs): fixed, so both builders and every rerun cut the same units."""

RESUME_KEY = "resume.json"


def resume_units(jobs: list) -> list[list]:
    """The resumable shard units of `jobs`, in order (unit i is written as part-<i>-<n>.parquet)."""
    return [jobs[i:i + RESUME_UNIT] for i in range(0, len(jobs), RESUME_UNIT)]


def write_unit(root: str, unit: int, rows: Iterable[tuple[dict, str]], k: int, cpu_s: float = 0.0) -> dict[str, Any]:
    """Write one unit's rows as its shard files under `root`; its report: unit index, (id, source) per protein,
    shard entries, length histogram, CPU seconds."""
    start = time.process_time()
    writer = shards.ShardWriter(root, k=k, file_prefix=f"part-{unit:05d}", clear=False)
    sources = []
    for row, source in rows:
        writer.add(row)
        sources.append((row["id"], source))
    entries, histogram = writer.finish()
    return {"task": unit, "sources": sources, "shards": entries, "histogram": histogram,
            "cpu_s": cpu_s + time.process_time() - start}


class ShardLedger:
    """The finished units of a resumable run, one `done-<unit>.json` report each beside their shard files
    (written after them, so a listed unit is complete). Local directories only; elsewhere it records nothing."""

    def __init__(self, root: str) -> None:
        self.root = None if storage.is_uri(root) else Path(root)

    def finished(self) -> dict[int, dict[str, Any]]:
        if self.root is None:
            return {}
        return {int(path.stem.split("-")[1]): json.loads(path.read_text()) for path in self.root.glob("done-*.json")}

    def record(self, report: dict[str, Any]) -> dict[str, Any]:
        if self.root is not None:
            tmp = self.root / f"done-{report['task']:05d}.json.tmp"
            tmp.write_text(json.dumps(report))
            os.replace(tmp, self.root / f"done-{report['task']:05d}.json")
        return report

    def clear(self) -> None:
        """Drop the ledger once the set's manifest is written (the staging dir then becomes the set)."""
        if self.root is not None:
            for path in self.root.glob("done-*.json"):
                path.unlink()
