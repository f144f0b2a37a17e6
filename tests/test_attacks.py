"""One stranger against a class, over raw HTTP and gradio_client, several clients at once:
they cannot wipe other people's sessions, stall their prunes, or fill the disk.

Clients are told apart by X-Forwarded-For (the app runs with ECOFLAP_BEHIND_PROXY=1),
as a deployment behind a proxy tells its visitors apart.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import pytest
from gradio_client import Client, handle_file

from conftest import EXAMPLE, FAST, launch

pytestmark = pytest.mark.slow
LIMITS = dict(ECOFLAP_BEHIND_PROXY="1", ECOFLAP_MAX_SESSIONS="8", ECOFLAP_MAX_SESSIONS_PER_CLIENT="3",
              ECOFLAP_MAX_JOBS_PER_SESSION="1", ECOFLAP_MAX_JOBS_PER_CLIENT="2")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """The app with small bounds, and its log."""
    process, url, log, uploads = launch(tmp_path_factory, **LIMITS)
    yield url, log, uploads
    process.terminate()
    process.wait(timeout=30)


def visitor(url: str, address: str) -> Client:
    return Client(url, verbose=False, headers={"X-Forwarded-For": address})


def call(url: str, api: str, data: list, address: str, session_hash: str | None = None) -> tuple[str, object]:
    """POST the raw /call API as `address`, then read its result: ("complete" | "error", data)."""
    base = url.rstrip("/") + "/gradio_api"
    headers = {"X-Forwarded-For": address}
    body = {"data": data, "session_hash": session_hash or uuid.uuid4().hex}
    posted = httpx.post(f"{base}/call/{api}", json=body, headers=headers, timeout=60)
    if posted.status_code != 200:
        return "refused", posted.text
    kind, payload = None, None
    with httpx.stream("GET", f"{base}/call/{api}/{posted.json()['event_id']}", headers=headers,
                      timeout=300) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                payload = json.loads(line.split(":", 1)[1])
                break
    return kind, payload


def stats(url: str) -> dict:
    return visitor(url, "127.0.0.1").predict(api_name="/stats")


def run_ids(c: Client) -> list[str]:
    return [r["run"] for r in c.predict(handle_file(str(EXAMPLE)), "", api_name="/ask")[1]["runs"]]


def test_a_flood_of_new_sessions_wipes_nobody(guarded):
    url, log, _ = guarded
    students = [visitor(url, f"10.0.0.{i}") for i in (1, 2)]
    runs = [c.predict("magnitude", 0.5, api_name="/prune", **FAST)[-2] for c in students]
    before = stats(url)["sessions"]
    for _ in range(20):  # the page's own start: not in the API, and it holds nothing
        call(url, "new_session", [], "10.6.6.6")
    assert stats(url)["sessions"] == before

    def flood(address):
        for _ in range(15):
            call(url, "describe", [], address)

    threads = [threading.Thread(target=flood, args=(f"10.6.6.{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [run_ids(c) for c in students] == [[r] for r in runs]
    assert "ended" not in json.dumps(students[0].predict(api_name="/describe"))
    # an attacker whose sessions all hold runs is refused one more, with one line
    attacker = "10.6.6.9"
    hashes = [uuid.uuid4().hex for _ in range(3)]
    for h in hashes:
        assert call(url, "prune", ["magnitude", 0.5, "block", 0, 32, 8, 0.001, "off", ["vision", "language"], 8, 5,
                                   0.08, ""], attacker, h)[0] == "complete"
    kind, result = call(url, "describe", [], attacker)
    assert kind == "error" and "already have 3 sessions with work in them" in json.dumps(result)
    assert "Traceback" not in log.read_text()


def test_one_client_cannot_take_the_long_slots(guarded):
    url, log, _ = guarded
    sessions = [visitor(url, "10.6.6.7") for _ in range(3)]
    jobs = [c.submit("ecoflap_zeroth", 0.5, api_name="/prune") for c in sessions for _ in range(4)]
    deadline = time.time() + 120
    while sum(job.done() for job in jobs) < 10 and time.time() < deadline:
        time.sleep(0.1)  # refusals are immediate; two prunes go on
    refused = []
    student = visitor(url, "10.0.0.3")
    assert "Magnitude @ 0.50" in student.predict("magnitude", 0.5, api_name="/prune", **FAST)[0]
    for job in jobs:
        if job.done() and job.exception() is not None:
            refused.append(str(job.exception()))
        else:
            job.cancel()
    assert len(refused) == 10, refused  # the client's bound is 2 jobs, whatever its sessions
    assert sum("(at most 1 per session)" in r for r in refused) >= 4
    assert all("already have" in r and "wait for one to finish" in r for r in refused)
