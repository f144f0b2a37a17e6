"""The app as a stranger on the internet sees it: raw HTTP and gradio_client, several at once.

Only uploads are opened, nothing echoes a server path, nobody reaches another session's
runs, quotas are per session, a cancelled or abandoned job stops and stores nothing, and
answers are not queued behind other people's long jobs.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import httpx
import pytest
from gradio_client import handle_file

from conftest import APP_FILES, EXAMPLE, STATS_KEY, client, prune, wait_for_progress
from ecoflap.serve.soak import raw_call

PATHS = ["/etc/passwd", "/etc/shadow", "/root", "/no/such/file.png", "/proc/self/environ",
         "/tmp/../etc/passwd", "assets/examples/scene1.png", "../../../../etc/hosts", "", "\x00"]


def _no_server_detail(text: str):
    for leak in ("/etc", "/root", "/proc", "/tmp", "Errno", "No such file", "Is a directory", "Permission denied",
                 "Traceback", os.getcwd()):
        assert leak not in text, (leak, text)


@pytest.mark.parametrize("payload", [{"path": p} for p in PATHS] + PATHS +
                         [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}},
                          {"url": "data:image/png;base64,iVBORw0KGgo="}, {"path": None}, 42, ["/etc/passwd"]])
def test_raw_paths_are_never_opened_nor_echoed(app, payload):
    shipped = "examples/scene1.png" in json.dumps(payload)
    calls = [("ask", [payload, "what is this?"])]
    if not shipped and payload not in ("", {"path": ""}):
        calls.append(("compare", [["wanda", "magnitude"], 0.5, payload, ""]))
    for api, data in calls:
        kind, result = raw_call(app, api, data)
        text = json.dumps(result)
        assert kind in ("complete", "error"), (api, payload, text[:200])  # never a refused request
        if payload == {"path": "/tmp/../etc/passwd"} or kind == "error":
            assert kind == "error", (api, payload, text[:200])
        _no_server_detail(text)
        if kind == "complete" and api == "ask":
            # only a path that resolves into the shipped examples can be read
            assert "examples/scene1.png" in json.dumps(payload) or payload in ("", {"path": ""}), payload


def test_a_link_in_the_upload_folder_to_a_server_file_is_refused(app):
    link = APP_FILES["uploads"] / f"{uuid.uuid4().hex}.png"
    os.symlink("/etc/hostname" if os.path.exists("/etc/hostname") else "/etc/passwd", link)
    try:
        kind, result = raw_call(app, "ask", [{"path": str(link)}, ""])
    finally:
        link.unlink()
    assert kind == "error" and "uploaded to this page" in json.dumps(result)


def test_a_stranger_cannot_reach_another_sessions_run(app):
    owner = client(app)
    *_, run_id, _ = prune(owner, "magnitude", 0.8)
    for api, data in [("export", [run_id, True]), ("export", [run_id, False]), ("distributions", [run_id, None])]:
        kind, result = raw_call(app, api, data, session=uuid.uuid4().hex)
        assert kind == "error" and "No run with that id in this session" in json.dumps(result)
    kind, result = raw_call(app, "ask", [{"path": str(EXAMPLE)}, ""], session=uuid.uuid4().hex)
    assert kind == "complete" and run_id not in json.dumps(result)


def test_questions_must_be_text(app):
    for question in (42, ["what?"], {"q": 1}):
        kind, result = raw_call(app, "ask", [{"path": str(EXAMPLE)}, question])
        assert kind == "error" and "question must be text" in json.dumps(result)


def test_each_session_has_its_own_quota(strict_app):
    url, _log = strict_app
    a, b = client(url), client(url)
    *_, kept, _ = prune(a, "magnitude", 0.5)
    statuses = [prune(b, "magnitude", s)[0] for s in (0.1, 0.2, 0.3)]
    answers = a.predict(handle_file(str(EXAMPLE)), "", api_name="/ask")[1]
    assert [r["run"] for r in answers["runs"]] == [kept]
    assert "Magnitude @ 0.50" not in " ".join(statuses)
    assert "Magnitude @ 0.10 was dropped" in statuses[-1] and "at most 2 runs" in statuses[-1]


def test_a_cancelled_prune_stops_and_stores_nothing(app):
    c = client(app)
    before = c.predict(STATS_KEY, api_name="/stats")
    job = c.submit("ecoflap_zeroth", 0.5, api_name="/prune")
    wait_for_progress(job)
    job.cancel()
    deadline = time.time() + 60
    while c.predict(STATS_KEY, api_name="/stats")["jobs_running"] and time.time() < deadline:
        time.sleep(0.2)
    after = c.predict(STATS_KEY, api_name="/stats")
    assert after["jobs_running"] == 0 and after["stored_runs"] == before["stored_runs"]
    assert "stopped" in APP_FILES["log"].read_text()


def test_a_closed_event_stream_stops_the_job(app):
    base = app.rstrip("/") + "/gradio_api"
    config = httpx.get(app.rstrip("/") + "/config").json()
    fn = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "prune")
    before = client(app).predict(STATS_KEY, api_name="/stats")
    session_hash = uuid.uuid4().hex
    data = ["ecoflap_first", 0.5, "block", 0, 128, 0, 0.001, "off", ["vision", "language"], 8, 5, 0.08, None, "", [],
            "", "answer", None]
    assert httpx.post(f"{base}/queue/join", json={"data": data, "fn_index": fn, "session_hash": session_hash}).is_success
    with httpx.stream("GET", f"{base}/queue/data", params={"session_hash": session_hash}, timeout=60) as stream:
        for line in stream.iter_lines():
            if '"progress"' in line:
                break
    c = client(app)
    deadline = time.time() + 60
    while c.predict(STATS_KEY, api_name="/stats")["jobs_running"] and time.time() < deadline:
        time.sleep(0.2)
    after = c.predict(STATS_KEY, api_name="/stats")
    assert after["jobs_running"] == 0 and after["stored_runs"] == before["stored_runs"]


def test_answers_go_on_while_someone_sweeps(app):
    sweeper, asker = client(app), client(app)
    job = sweeper.submit(["wanda", "magnitude"], "0.3,0.5,0.7", api_name="/sweep")
    wait_for_progress(job)
    asker.predict(handle_file(str(EXAMPLE)), "how many shapes are there?", api_name="/ask")
    assert not job.done(), "the answer waited for the whole sweep"
    job.result()


def test_strict_limits_hold(strict_app, tmp_path):
    url, log = strict_app
    c = client(url)
    with pytest.raises(Exception, match="at most 3 points"):
        c.predict(["wanda", "magnitude"], "0.3,0.5", api_name="/sweep")
    *_, run_id, _ = prune(c, "magnitude", 0.5)
    with pytest.raises(Exception, match="turned off"):
        c.predict(run_id, True, api_name="/export")
    assert c.predict(STATS_KEY, api_name="/stats")["export_mib"] == 0
    big = tmp_path / "big.png"
    big.write_bytes(EXAMPLE.read_bytes() + os.urandom(2 * 2**20))
    with pytest.raises(Exception):
        c.predict(handle_file(str(big)), "", api_name="/ask")
    text = log.read_text()
    assert "refused: saving pruned models is turned off" in text
    assert text.count("Traceback") == 0


def test_many_strangers_at_once_never_change_the_full_answers(app):
    baseline = client(app).predict(handle_file(str(EXAMPLE)), "", api_name="/ask")[1]["full"]
    errors = []

    def stranger(i):
        try:
            for api, data in [("ask", [{"path": p}, "x" * (i * 300)]) for p in PATHS[:5]] + [
                    ("prune", ["wanda", "abc"]), ("export", ["run-" + "A" * 16, True])]:
                assert raw_call(app, api, data)[0] in ("complete", "error"), api
        except Exception as err:  # reported below
            errors.append(err)

    def student():
        try:
            c = client(app)
            prune(c, "wanda", 0.6)
            for _ in range(3):
                assert c.predict(handle_file(str(EXAMPLE)), "", api_name="/ask")[1]["full"] == baseline
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=stranger, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=student))
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert client(app).predict(handle_file(str(EXAMPLE)), "", api_name="/ask")[1]["full"] == baseline


def test_the_soak_command_runs_against_the_app_and_checks_what_matters(app, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, "-m", "ecoflap", "soak", "--url", app, "--users", "2", "--minutes", "0.15",
                           "--stats-key", STATS_KEY, "--json", str(out)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["ok"] and result["leaks"] == result["silent_losses"] == result["changed_full_answers"] == 0
    assert result["ask_seconds"]["n"] > 0 and result["samples"]
    assert "full answers changed: 0" in done.stdout


def test_the_soak_refuses_other_hosts_without_consent():
    from ecoflap.serve.soak import soak

    with pytest.raises(ValueError, match="not this machine"):
        soak("http://example.com:7860/", users=1, minutes=0.1)
    with pytest.raises(ValueError, match="users must be"):
        soak("http://127.0.0.1:7860/", users=500, minutes=1)
