"""Time the structure readers on the AlphaFold BamA model (810 residues) and report structures/s per core.

    .venv/bin/python tools/bench_structures.py [--copies 200] [--pdb path/to/AF-B7MBF8-F1-model_v2.pdb]

Times are CPU seconds of this single process (time.process_time), so the figure is per core and is not
flattered or penalised by other jobs sharing the machine's cores. Copies are written to a temporary directory
so the per-file loop includes opening and reading a file that is not the one just parsed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

from protopo_ray.data.structures import READERS, align_to_sequence, load_aligned_ca, read_structure

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "deeptmhmm"
BAMA = DATA / "structures" / "AF-B7MBF8-F1-model_v2.pdb"


def rate(paths: list[Path], work) -> float:
    """Structures per CPU second over `paths` (one warm-up call first, so imports are not counted)."""
    work(paths[0])
    start = time.process_time()
    for path in paths:
        work(path)
    return len(paths) / (time.process_time() - start)


def write_copies(source: Path, directory: Path, copies: int) -> dict[str, list[Path]]:
    """Copies of the model as .pdb, .pdb.gz, .cif and .cif.gz (the mmCIF written by gemmi)."""
    import gemmi

    structure = gemmi.read_structure(str(source))
    structure.setup_entities()
    cif_text = structure.make_mmcif_document().as_string()
    pdb_bytes = source.read_bytes()
    files: dict[str, list[Path]] = {".pdb": [], ".pdb.gz": [], ".cif": [], ".cif.gz": []}
    for i in range(copies):
        base = directory / f"AF-BENCH{i:04d}-F1-model_v4"
        for suffix, payload in ((".pdb", pdb_bytes), (".cif", cif_text.encode())):
            path = base.with_name(base.name + suffix)
            path.write_bytes(payload)
            files[suffix].append(path)
            gz = path.with_name(path.name + ".gz")
            gz.write_bytes(gzip.compress(payload, compresslevel=6))
            files[suffix + ".gz"].append(gz)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pdb", type=Path, default=BAMA)
    parser.add_argument("--copies", type=int, default=200)
    parser.add_argument("--biopython-copies", type=int, default=20, help="Bio.PDB is slow; time fewer files")
    args = parser.parse_args()
    if not args.pdb.exists():
        print(f"skipped: {args.pdb} not found (the BamA AlphaFold model lives in ../shared/data)")
        return
    sequence = read_structure(args.pdb).sequence
    if (partitions := DATA / "DeepTMHMM.partitions.json").exists():
        entries = [e for fold in json.loads(partitions.read_text()).values() for e in fold]
        sequence = next((e["sequence"] for e in entries if e["id"] == "B7MBF8"), sequence)
    # A record with one residue changed and one deleted forces the alignment path instead of the exact match.
    edited = sequence[:100] + ("A" if sequence[100] != "A" else "G") + sequence[101:400] + sequence[401:]

    print(f"{args.pdb.name}: {len(sequence)} residues, {args.copies} copies per format; structures/s per core")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        files = write_copies(args.pdb, Path(tmp), args.copies)
        for reader in READERS:
            count = args.biopython_copies if reader == "biopython" else args.copies
            for fmt, paths in files.items():
                results.append((reader, fmt, rate(paths[:count], lambda p, r=reader: read_structure(p, reader=r))))
        paths = files[".pdb"]
        results.append(("fast+align exact", ".pdb",
                        rate(paths, lambda p: align_to_sequence(read_structure(p), sequence))))
        results.append(("fast+align edited", ".pdb",
                        rate(paths, lambda p: align_to_sequence(read_structure(p), edited))))
        (Path(tmp) / "B7MBF8.pdb").write_bytes(args.pdb.read_bytes())
        record = type("Record", (), {"id": "B7MBF8", "sequence": sequence})()
        results.append(("load_aligned_ca", ".pdb", rate([Path(tmp)] * args.copies,
                                                        lambda d: load_aligned_ca(d, record))))
    width = max(len(r) for r, _, _ in results)
    for reader, fmt, per_s in results:
        print(f"  {reader:<{width}}  {fmt:<8} {per_s:8.1f} /s  ({1000 / per_s:7.2f} ms each)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
