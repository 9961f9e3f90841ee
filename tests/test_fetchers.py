"""tools/fetch_alphafold.py and tools/fetch_deeptmhmm.py against a local, deliberately unreliable HTTP server."""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BAMA_PDB = REPO.parent / "shared" / "data" / "deeptmhmm" / "structures" / "AF-B7MBF8-F1-model_v2.pdb"

if str(REPO) not in sys.path:  # tools/ is not part of the installed package
    sys.path.insert(0, str(REPO))

from tools import fetch_alphafold, fetch_deeptmhmm  # noqa: E402
from tools.fetch_alphafold import fetch_many, model_name, read_ids  # noqa: E402

FAST = {"retries": 3, "timeout_s": 2.0, "backoff_s": 0.01}


@dataclass
class Behaviour:
    """What the server serves and how it misbehaves; file names are paths under /files/."""

    files: dict[str, bytes] = field(default_factory=dict)
    drop_times: Counter = field(default_factory=Counter)
    """name -> how many more times to send the full Content-Length, half the body, then hang up."""
    error_500_times: Counter = field(default_factory=Counter)
    """name -> how many more times to answer 500 (a large number: fails for good)."""
    stall_times: Counter = field(default_factory=Counter)
    """name -> how many more times to send the headers, then stall for `stall_s` before the body."""
    stall_s: float = 1.0
    honour_range: bool = True
    hits: Counter = field(default_factory=Counter)
    range_requests: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def make_handler(behaviour: Behaviour) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            name = self.path.removeprefix("/files/")
            range_header = self.headers.get("Range")
            with behaviour.lock:
                behaviour.hits[name] += 1
                if range_header:
                    behaviour.range_requests.append((name, range_header))
                fail = behaviour.error_500_times[name] > 0
                behaviour.error_500_times[name] -= fail
                drop = behaviour.drop_times[name] > 0
                behaviour.drop_times[name] -= drop
                stall = behaviour.stall_times[name] > 0
                behaviour.stall_times[name] -= stall
            if fail:
                self.send_error(500, "injected failure")
                return
            body = behaviour.files.get(name)
            if body is None:
                self.send_error(404)
                return
            start = 0
            if range_header and behaviour.honour_range:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if stall:
                self.wfile.flush()
                time.sleep(behaviour.stall_s)
            if drop:
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def server(monkeypatch) -> Iterator[tuple[str, Behaviour]]:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # traffic must go straight to 127.0.0.1
    behaviour = Behaviour()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(behaviour))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/files", behaviour
    httpd.shutdown()
    httpd.server_close()


def pdb_text(id_: str, num_atoms: int = 200) -> bytes:
    lines = [f"HEADER    TEST MODEL {id_}"]
    lines += [f"ATOM  {i:5d}  CA  ALA A{i:4d}      {i:8.3f}   0.000   0.000  1.00 90.00           C"
              for i in range(1, num_atoms + 1)]
    return ("\n".join(lines) + "\nEND\n").encode()


def serve_models(behaviour: Behaviour, ids: list[str]) -> dict[str, bytes]:
    models = {id_: pdb_text(id_) for id_ in ids}
    behaviour.files.update({model_name(id_): body for id_, body in models.items()})
    return models


def part_files(out: Path) -> list[Path]:
    return sorted(out.glob("*.part"))


def test_fetch_many_downloads_retries_and_reports_not_found(server, tmp_path):
    base_url, behaviour = server
    models = serve_models(behaviour, ["P10384", "P0ABU7", "Q00001", "Q00002"])
    behaviour.drop_times[model_name("Q00001")] = 2
    behaviour.error_500_times[model_name("Q00002")] = 1
    ids = ["P10384", "P0ABU7", "Q00001", "Q00002", "Z99999"]
    if BAMA_PDB.exists():
        models["B7MBF8"] = BAMA_PDB.read_bytes()
        behaviour.files[model_name("B7MBF8")] = models["B7MBF8"]
        ids.append("B7MBF8")

    report = fetch_many(ids, tmp_path, base_url, num_workers=4, **FAST)

    assert report.ok and report.failed == {}
    assert report.downloaded == [i for i in ids if i != "Z99999"]  # input order, not completion order
    assert report.not_found == ["Z99999"]
    assert (tmp_path / "not_found.txt").read_text() == "Z99999\n"
    for id_, body in models.items():
        assert (tmp_path / model_name(id_)).read_bytes() == body
    assert part_files(tmp_path) == []
    assert behaviour.hits[model_name("Q00001")] == 3  # two dropped, then complete
    assert behaviour.hits[model_name("Q00002")] == 2  # one 500, then served
    assert behaviour.hits[model_name("Z99999")] == 1  # 404 is final, never retried


def test_dropped_connection_resumes_with_range(server, tmp_path):
    base_url, behaviour = server
    models = serve_models(behaviour, ["Q00001"])
    behaviour.drop_times[model_name("Q00001")] = 1
    report = fetch_many(["Q00001"], tmp_path, base_url, **FAST)
    assert report.downloaded == ["Q00001"]
    assert (tmp_path / model_name("Q00001")).read_bytes() == models["Q00001"]
    half = len(models["Q00001"]) // 2
    assert behaviour.range_requests == [(model_name("Q00001"), f"bytes={half}-")]


def test_server_ignoring_range_restarts_instead_of_appending(server, tmp_path):
    base_url, behaviour = server
    models = serve_models(behaviour, ["Q00001"])
    behaviour.honour_range = False
    behaviour.drop_times[model_name("Q00001")] = 2
    report = fetch_many(["Q00001"], tmp_path, base_url, **FAST)
    assert report.downloaded == ["Q00001"]
    assert (tmp_path / model_name("Q00001")).read_bytes() == models["Q00001"]
    assert part_files(tmp_path) == []


def test_stalled_body_times_out_and_is_retried(server, tmp_path):
    base_url, behaviour = server
    models = serve_models(behaviour, ["Q00004"])
    behaviour.stall_times[model_name("Q00004")] = 1
    report = fetch_many(["Q00004"], tmp_path, base_url, **{**FAST, "timeout_s": 0.2})
    assert report.downloaded == ["Q00004"]
    assert (tmp_path / model_name("Q00004")).read_bytes() == models["Q00004"]
    assert behaviour.hits[model_name("Q00004")] == 2


def test_rerun_skips_existing_files(server, tmp_path):
    base_url, behaviour = server
    serve_models(behaviour, ["P10384", "P0ABU7"])
    ids = ["P10384", "P0ABU7", "Z99999"]
    fetch_many(ids, tmp_path, base_url, **FAST)
    hits_before = Counter(behaviour.hits)

    report = fetch_many(ids, tmp_path, base_url, **FAST)

    assert report.skipped == ["P10384", "P0ABU7"] and report.downloaded == []
    assert report.not_found == ["Z99999"]  # not-found ids are asked again: the database may have gained them
    assert behaviour.hits - hits_before == Counter({model_name("Z99999"): 1})


def test_permanent_failure_exit_code_1(server, tmp_path, capsys):
    base_url, behaviour = server
    models = serve_models(behaviour, ["P10384", "Q00003"])
    behaviour.error_500_times[model_name("Q00003")] = 10**6
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("# ids\nP10384\n\nQ00003  # always 500\n")
    out = tmp_path / "models"

    code = fetch_alphafold.main([str(ids_file), "--out", str(out), "--base-url", base_url, "--workers", "2",
                                 "--retries", "2", "--timeout-s", "2", "--backoff-s", "0.01"])

    assert code == 1
    stdout = capsys.readouterr().out
    assert "downloaded 1, skipped (existing) 0, not found 0, failed 1" in stdout
    assert "FAILED Q00003" in stdout and "HTTP 500" in stdout
    assert behaviour.hits[model_name("Q00003")] == 3  # first try + 2 retries
    assert (out / model_name("P10384")).read_bytes() == models["P10384"]
    assert not (out / model_name("Q00003")).exists()


def test_main_exit_code_0_with_not_found(server, tmp_path, capsys):
    base_url, behaviour = server
    serve_models(behaviour, ["P10384"])
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("P10384\nZ99999\n")
    code = fetch_alphafold.main([str(ids_file), "--out", str(tmp_path / "m"), "--base-url", base_url,
                                 "--backoff-s", "0.01"])
    assert code == 0
    assert (tmp_path / "m" / "not_found.txt").read_text() == "Z99999\n"
    assert "not found: Z99999" in capsys.readouterr().out


def test_cif_format_and_version_in_file_name(server, tmp_path):
    base_url, behaviour = server
    behaviour.files["AF-P10384-F1-model_v3.cif"] = b"data_test\n"
    report = fetch_many(["P10384"], tmp_path, base_url, version=3, fmt="cif", **FAST)
    assert report.downloaded == ["P10384"]
    assert (tmp_path / "AF-P10384-F1-model_v3.cif").read_bytes() == b"data_test\n"


def test_read_ids_plain_list_with_comments_and_duplicates(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("# header\nP10384\n\n  P0ABU7  # trailing comment\nP10384\n")
    assert read_ids(path) == ["P10384", "P0ABU7"]


def test_read_ids_three_line(tmp_path):
    path = tmp_path / "set.3line"
    path.write_text(">P10384|BETA\nMSQK\nSSSS\n>P0ABU7|TM\nMGNN\nOOOO\n")
    assert read_ids(path) == ["P10384", "P0ABU7"]


def test_read_ids_partitions_json(tmp_path):
    path = tmp_path / "partitions.json"
    record = {"sequence": "MA", "labels": "OO"}
    path.write_text(json.dumps({"cv0": [{"id": "P10384", **record}], "cv1": [{"id": "P0ABU7", **record}]}))
    assert read_ids(path) == ["P10384", "P0ABU7"]


def test_read_ids_rejects_unsafe_id_with_location(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("P10384\n../etc/passwd\n")
    with pytest.raises(ValueError, match=r"ids.txt:2: '../etc/passwd'"):
        read_ids(path)


def test_read_ids_real_partitions(partitions_json):
    ids = read_ids(partitions_json)
    assert len(ids) == 3576 and ids[0] == "P10384"


# --- fetch_deeptmhmm -------------------------------------------------------------------------------------------

PARTITIONS = json.dumps({"cv0": [{"id": "P10384", "sequence": "MA", "labels": "OO"}]}).encode()


def test_deeptmhmm_downloads_and_verifies_sha256(server, tmp_path, capsys):
    base_url, behaviour = server
    behaviour.files["DeepTMHMM.partitions.json"] = PARTITIONS
    behaviour.drop_times["DeepTMHMM.partitions.json"] = 1
    digest = hashlib.sha256(PARTITIONS).hexdigest()
    code = fetch_deeptmhmm.main(["--out", str(tmp_path), "--base-url", base_url, "--sha256", digest,
                                 "--backoff-s", "0.01"])
    assert code == 0
    assert (tmp_path / "DeepTMHMM.partitions.json").read_bytes() == PARTITIONS
    assert digest in capsys.readouterr().out
    assert part_files(tmp_path) == []


def test_deeptmhmm_wrong_sha256_fails_and_leaves_no_file(server, tmp_path, capsys):
    base_url, behaviour = server
    behaviour.files["DeepTMHMM.partitions.json"] = PARTITIONS
    code = fetch_deeptmhmm.main(["--out", str(tmp_path), "--base-url", base_url, "--sha256", "0" * 64])
    assert code == 1
    assert "does not match the expected" in capsys.readouterr().err
    assert not (tmp_path / "DeepTMHMM.partitions.json").exists() and part_files(tmp_path) == []


def test_deeptmhmm_corrupted_json_is_a_clear_error(server, tmp_path, capsys):
    base_url, behaviour = server
    behaviour.files["DeepTMHMM.partitions.json"] = b'{"cv0": [{"id": "P10384",'
    code = fetch_deeptmhmm.main(["--out", str(tmp_path), "--base-url", base_url, "--backoff-s", "0.01"])
    assert code == 1
    err = capsys.readouterr().err
    assert "DeepTMHMM.partitions.json is not valid JSON (line 1" in err
    assert behaviour.hits["DeepTMHMM.partitions.json"] == 1  # a complete but bad body is not retried
    assert not (tmp_path / "DeepTMHMM.partitions.json").exists()


def test_deeptmhmm_extra_files_and_existing_file_checked(server, tmp_path):
    base_url, behaviour = server
    behaviour.files["DeepTMHMM.partitions.json"] = PARTITIONS
    behaviour.files["README.txt"] = b"notes\n"
    files = ["DeepTMHMM.partitions.json", "README.txt"]
    results = fetch_deeptmhmm.fetch_files(tmp_path, base_url, files, backoff_s=0.01)
    assert [r.status for r in results] == ["downloaded", "downloaded"]
    (tmp_path / "DeepTMHMM.partitions.json").write_bytes(b"not json")  # damaged after download
    results = fetch_deeptmhmm.fetch_files(tmp_path, base_url, files, backoff_s=0.01)
    assert [r.status for r in results] == ["failed", "skipped"]
    assert "delete it to download again" in results[0].error
    assert behaviour.hits["DeepTMHMM.partitions.json"] == 1


def test_deeptmhmm_sha256_argument_forms():
    files = ["a.json", "b.json"]
    assert fetch_deeptmhmm.parse_sha256_args([f"b.json={'A' * 64}"], files) == {"b.json": "a" * 64}
    with pytest.raises(ValueError, match="NAME=HEX"):
        fetch_deeptmhmm.parse_sha256_args(["a" * 64], files)
    with pytest.raises(ValueError, match="64 hex digits"):
        fetch_deeptmhmm.parse_sha256_args(["a.json=abc"], files)


def test_known_sha256_matches_shared_copy(partitions_json):
    expected = fetch_deeptmhmm.KNOWN_SHA256["DeepTMHMM.partitions.json"]
    assert fetch_deeptmhmm.sha256_of(partitions_json) == expected
