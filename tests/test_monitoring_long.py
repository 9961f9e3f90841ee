"""A search watched end to end, by hand (`-m long`, ~3 min on 2 cores): a `ray start` head with token authentication,
the smoke search's first stage joined to it with `--prometheus`, Prometheus's HTTP API answering for a trial's
validation loss over time, a Ray Train run listed by name on the dashboard's Train API, and headless Chromium loading
the dashboard's Actors and Jobs pages with the token, the trials' names in them.

Needs Debian's `prometheus` and `chromium` packages (skipped without them; CI has neither). With
PROTOPO_SCREENSHOTS=DIR the pages' screenshots land in DIR (docs/img for docs/monitoring.md).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from test_cluster_jobs import kill_cluster
from test_connect import start_head

pytestmark = [pytest.mark.ray, pytest.mark.long]

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1500,1400",
                  "--remote-debugging-port=0"]


#: Two trials long enough (1-2 min) for several of Ray's 10 s metric exports and Prometheus scrapes.
WATCHED = """
[[stages]]
name = "architecture"
search = "grid"
scheduler = "none"
metric = "val_loss"
mode = "min"
max_epochs = 100
[stages.grid]
"model.lstm_size" = [16, 8]
"""


def get_json(url: str, token: str | None = None, timeout_s: float = 10):
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout_s) as reply:
        return json.loads(reply.read().decode())


async def _browse(browser: str, pages: list[tuple[str, str, list[str]]], token: str, shots: Path | None) -> dict:
    """Load each (name, url, expected texts) in headless Chromium with the dashboard's token (as its login would set
    it: the cookie, and the header for the API calls); each page's text once every expected text is in it."""
    import aiohttp  # deferred: Ray's dependency, only this by-hand test talks to Chromium's DevTools protocol

    profile = tempfile.mkdtemp(prefix="protopo-chromium-")
    process = subprocess.Popen([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    texts: dict[str, str] = {}
    try:
        line = ""
        while "DevTools listening on" not in line:
            line = process.stderr.readline()
            assert line or process.poll() is None, "chromium exited before it listened"
        devtools = re.search(r"ws://127.0.0.1:(\d+)/", line).group(1)
        target = next(t for t in get_json(f"http://127.0.0.1:{devtools}/json/list") if t["type"] == "page")
        async with aiohttp.ClientSession() as session, session.ws_connect(target["webSocketDebuggerUrl"],
                                                                          max_msg_size=0) as ws:
            counter = 0

            async def call(method: str, **params):
                nonlocal counter
                counter += 1
                await ws.send_json({"id": counter, "method": method, "params": params})
                while True:
                    message = await ws.receive_json()
                    if message.get("id") == counter:
                        return message.get("result", {})

            await call("Network.enable")
            await call("Network.setExtraHTTPHeaders", headers={"Authorization": f"Bearer {token}"})
            for name, url, expected in pages:
                await call("Network.setCookie", name="ray-authentication-token", value=token, url=url)
                await call("Page.navigate", url=url)
                deadline = time.time() + 60
                text = ""
                while time.time() < deadline:
                    await asyncio.sleep(1)
                    reply = await call("Runtime.evaluate", expression="document.body.innerText", returnByValue=True)
                    text = reply.get("result", {}).get("value") or ""
                    if all(e in text for e in expected):
                        break
                texts[name] = text
                if shots is not None:
                    await asyncio.sleep(1)
                    shot = await call("Page.captureScreenshot", format="png")
                    (shots / f"dashboard_{name}.png").write_bytes(base64.b64decode(shot["data"]))
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(profile, ignore_errors=True)
    return texts


def test_search_watched_through_prometheus_and_the_dashboard(smoke_shards, tmp_path):
    prometheus, browser = shutil.which("prometheus"), shutil.which("chromium")
    if not prometheus or not browser:
        pytest.skip("needs the prometheus and chromium binaries (apt-get install prometheus chromium)")
    head_dir = Path(tempfile.mkdtemp(prefix="rcm", dir="/tmp"))  # Ray's socket paths must stay short
    search = None
    try:
        env, address = start_head(head_dir, token=True)
        token = (head_dir / "auth_token").read_text().strip()
        dashboard = None  # read off the search's "Ray dashboard: ..." line
        env = {**env, "RAY_ADDRESS": address, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
        started = time.time()
        experiment = tmp_path / "watched.toml"
        experiment.write_text((REPO / "experiments" / "smoke.toml").read_text().split("[[stages]]")[0] + WATCHED)
        log = tmp_path / "search.log"
        with log.open("w") as sink:
            search = subprocess.Popen([sys.executable, "-m", "protopo_ray.tune", str(experiment), "--data",
                                       str(smoke_shards), "--storage", str(tmp_path), "--no-wandb", "--prometheus"], cwd=REPO, env=env, stdout=sink,
                                      stderr=subprocess.STDOUT)
        url, curve, texts = None, {}, {}
        shots = Path(os.environ["PROTOPO_SCREENSHOTS"]) if os.environ.get("PROTOPO_SCREENSHOTS") else None
        while search.poll() is None:
            output = log.read_text(errors="replace").splitlines()
            found = [m.group(1) for line in output for m in [re.search(r"^Prometheus: (http://\S+)", line)] if m]
            dashboard = dashboard or next((m.group(1) for line in output
                                           for m in [re.search(r"Ray dashboard: (http://\S+)", line)] if m), None)
            if found and url is None:
                url = found[0]
            if url:
                query = urllib.parse.urlencode({"query": 'ray_protopo_trial_val_loss{experiment="smoke"}',
                                                "start": started, "end": time.time(), "step": 2})
                try:
                    result = get_json(f"{url}/api/v1/query_range?{query}")["data"]["result"]
                    if result:
                        curve = {r["metric"]["trial"]: r["values"] for r in result}
                except OSError:
                    pass
            if curve and "actors" not in texts:  # mid-search: the trials' actors are alive
                texts.update(asyncio.run(_browse(browser, [("actors", f"{dashboard}/#/actors", ["Trial_architecture"])],
                                                 token, shots)))
            elif shots is not None and curve and min(map(len, curve.values())) >= 4 and "prometheus" not in texts:
                graph = urllib.parse.urlencode({"g0.expr": 'ray_protopo_trial_val_loss{experiment="smoke"}',
                                                "g0.tab": 0, "g0.range_input": "2m"})
                texts.update(asyncio.run(_browse(browser, [("prometheus", f"{url}/graph?{graph}", ["val_loss"])],
                                                 token, shots)))
            time.sleep(2)
        output = log.read_text(errors="replace").splitlines()
        search_s = time.time() - started
        assert search.returncode == 0, "\n".join(output[-60:])
        record = json.loads((tmp_path / "smoke" / "stages" / "architecture.json").read_text())
        trials = {t["trial_id"]: t for t in record["trials"]}
        assert url and curve, "\n".join(output[-60:])
        assert set(curve) <= set(trials)
        points = max(len(values) for values in curve.values())
        assert points >= 2  # over time: the gauge sampled at several scrapes
        for trial, values in curve.items():
            reported = {round(row["val_loss"], 6) for row in trials[trial]["history"]}
            assert {round(float(v), 6) for _, v in values} <= reported, (trial, values)

        # A Ray Train run on the same head: listed by its name on the dashboard's Train API (state tracking on).
        train = subprocess.run([sys.executable, "-m", "protopo_ray.train", "--config", "experiments/smoke.toml",
                                "--set", f"data.path='{smoke_shards}'", "--set", "train.epochs=1", "--set",
                                "name='watched_train'", "--storage", str(tmp_path / "train")], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=600)
        assert train.returncode == 0, train.stderr[-3000:]
        runs = get_json(f"{dashboard}/api/train/v2/runs/v1", token)  # Train V2 runs
        assert "watched_train" in json.dumps(runs), json.dumps(runs)[:2000]

        names = [f"architecture {trial}" for trial in trials]
        texts.update(asyncio.run(_browse(browser, [("jobs", f"{dashboard}/#/jobs", ["watched_train"])], token, shots)))
        shown = [name for name in names if name in texts["actors"]]
        assert len(shown) == len(trials), texts["actors"][:3000]  # two trials at a time, one actor each
        assert "Trial_architecture" in texts["actors"]
        assert "smoke" in texts["jobs"] and "watched_train" in texts["jobs"], texts["jobs"][:3000]
        print(f"\nsearch {search_s:.0f} s ({len(trials)} trials); Prometheus {url}: {len(curve)} trial curves, up to "
              f"{points} points each; Actors page mid-search shows {len(shown)} of {len(trials)} trial names; Train API "
              f"lists watched_train")
    finally:
        if search is not None and search.poll() is None:
            search.kill()
        kill_cluster(head_dir)
        shutil.rmtree(head_dir, ignore_errors=True)
