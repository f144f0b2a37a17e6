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

from conftest import EXAMPLE, FAST, STATS_KEY, launch, wait_for_progress
from ecoflap.serve.soak import FOREIGN_FILES, MARKUP, prune_values, raw_call

pytestmark = pytest.mark.slow
LIMITS = dict(ECOFLAP_BEHIND_PROXY="1", ECOFLAP_MAX_SESSIONS="16", ECOFLAP_MAX_SESSIONS_PER_CLIENT="3",
              ECOFLAP_MAX_JOBS_PER_SESSION="1", ECOFLAP_MAX_JOBS_PER_CLIENT="2", ECOFLAP_MAX_UPLOADS_PER_CLIENT="3",
              ECOFLAP_MAX_UPLOAD_CLIENT_MB="1", ECOFLAP_MAX_UPLOAD_TOTAL_MB="3")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """The app with small bounds, and its log."""
    process, url, log, uploads = launch(tmp_path_factory, **LIMITS)
    yield url, log, uploads
    process.terminate()
    process.wait(timeout=30)


def visitor(url: str, address: str) -> Client:
    return Client(url, verbose=False, headers={"X-Forwarded-For": address})


def stats(url: str) -> dict:
    return visitor(url, "127.0.0.1").predict(STATS_KEY, api_name="/stats")


def run_ids(c: Client) -> list[str]:
    return [r["run"] for r in c.predict(handle_file(str(EXAMPLE)), "", api_name="/ask")[1]["runs"]]


def test_a_flood_of_new_sessions_wipes_nobody(guarded):
    url, log, _ = guarded
    students = [visitor(url, f"10.0.0.{i}") for i in (1, 2)]
    runs = [c.predict("magnitude", 0.5, api_name="/prune", **FAST)[-2] for c in students]
    before = stats(url)["sessions"]
    for _ in range(20):  # the page's own start: not in the API, and it holds nothing
        raw_call(url, "new_session", [], "10.6.6.6")
    assert stats(url)["sessions"] == before

    def flood(address):
        for _ in range(10):
            raw_call(url, "describe", [], address)

    threads = [threading.Thread(target=flood, args=(f"10.6.6.{i}",)) for i in range(6)]  # 18 + 2 > 16 sessions
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
        assert raw_call(url, "prune", prune_values(), attacker, h)[0] == "complete"
    kind, result = raw_call(url, "describe", [], attacker)
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


def refused_with(url: str, api: str, data: list, address: str = "10.7.7.7") -> str:
    kind, result = raw_call(url, api, data, address)
    assert kind == "error" and isinstance(result, dict) and result.get("error"), (api, kind, str(result)[:300])
    return result["error"]


def test_what_a_stranger_typed_comes_back_cut_and_inert(guarded):
    url, log, _ = guarded
    for data in (prune_values(nm="2:" + "4" * 1_000_000), prune_values(vision_sparsity="9" * 1_000_000, method="per_modality"),
                 prune_values(method="w" * 1_000_000), prune_values(granularity="g" * 1_000_000)):
        message = refused_with(url, "prune", data)
        assert len(message) < 400 and "4" * 100 not in message and "9" * 100 not in message, message[:200]
    assert len(refused_with(url, "sweep", [["wanda"], "0." + "5" * 1_000_000])) < 400
    for data in (prune_values(vision_sparsity=MARKUP, method="per_modality"), prune_values(nm=MARKUP),
                 prune_values(method=MARKUP), prune_values(granularity=MARKUP, method="ecoflap_zeroth")):
        message = refused_with(url, "prune", data)
        assert "<img" not in message and "<" not in message, message
    assert "<" not in refused_with(url, "sweep", [[MARKUP], "0.5"])
    assert len(log.read_text().splitlines()[-1]) < 600  # the log line is cut too


def test_lone_surrogates_get_a_message(guarded):
    url, log, _ = guarded
    image = {"path": str(EXAMPLE)}
    assert "not text" in refused_with(url, "ask", [image, "\ud800"])
    assert "not text" in refused_with(url, "compare", [["wanda", "magnitude"], 0.5, image, "what \udfff"])
    for data in (prune_values(nm="\ud800"), prune_values(vision_sparsity="\ud800", method="per_modality"),
                 prune_values(method="\ud800")):
        assert "\\ud800" in refused_with(url, "prune", data)
    refused_with(url, "load_model", ["a\ud800/b"])
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("payload", FOREIGN_FILES)
def test_payloads_gradio_cannot_read_get_one_calm_line(guarded, payload):
    url, log, _ = guarded
    message = refused_with(url, "ask", [payload, ""])
    assert "/etc" not in message and ("form this endpoint takes" in message or "upload" in message), message
    assert "form this endpoint takes" in refused_with(url, "prune", ["magnitude"])  # too few values
    assert "Traceback" not in log.read_text()


def test_a_folder_on_the_server_answers_like_a_missing_hub_id(guarded):
    from conftest import ROOT

    url, _, _ = guarded
    owner = f"oracle-{uuid.uuid4().hex[:8]}"
    (ROOT / owner / "model").mkdir(parents=True)
    try:
        there = refused_with(url, "load_model", [f"{owner}/model"])
        missing = refused_with(url, "load_model", [f"{owner}/absent"])
    finally:
        (ROOT / owner / "model").rmdir()
        (ROOT / owner).rmdir()
    assert there.replace("/model", "/X") == missing.replace("/absent", "/X")


def test_minus_zero_sparsity_is_zero(guarded):
    url, _, _ = guarded
    kind, result = raw_call(url, "prune", prune_values(sparsity=-0.0), "10.7.7.8")
    assert kind == "complete" and "Magnitude @ 0.00" in result[0] and "-0.00" not in json.dumps(result)


def test_stats_answer_only_the_owner(guarded):
    url, _, _ = guarded
    for key in ([""], ["guess"], [None], [STATS_KEY[:-1]], [STATS_KEY + "x"]):
        kind, result = raw_call(url, "stats", key, "10.7.7.9")
        assert kind == "error" and "for the deployment's owner" in json.dumps(result), (key, result)
    with pytest.raises(Exception, match="for the deployment's owner"):
        visitor(url, "10.7.7.9").predict(api_name="/stats")
    assert set(stats(url)) >= {"sessions", "resident_mib", "jobs_running"}


def files_under(folder) -> dict:
    return {p: p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_exports_have_one_copy_which_the_bounds_reach(guarded):
    url, _, uploads = guarded
    session = uuid.uuid4().hex
    kind, result = raw_call(url, "prune", prune_values(), "10.8.8.8", session)
    run_id = result[-2]
    before = files_under(uploads)
    served = []
    for _ in range(3):
        kind, result = raw_call(url, "export", [run_id, True], "10.8.8.8", session)
        assert kind == "complete", result
        served.append(result[0])
    added = {p: size for p, size in files_under(uploads).items() if p not in before}
    newest = {f["path"] for f in served[-1]}
    assert {str(p) for p in added} == newest  # no second copy, nothing left of the replaced exports
    assert abs(sum(added.values()) / 2**20 - stats(url)["export_mib"]) < 0.001
    assert ".zip" in "".join(newest) and session not in "".join(newest)

    def fetch(file):
        return httpx.get(file["url"] if file["url"].startswith("http") else url.rstrip("/") + file["url"], timeout=30)

    assert fetch(served[0][0]).status_code in (403, 404) and fetch(served[-1][0]).status_code == 200


def upload(url: str, address: str, content: bytes, name: str = "image.png") -> httpx.Response:
    return httpx.post(url.rstrip("/") + "/gradio_api/upload", files=[("files", (name, content, "image/png"))],
                      headers={"X-Forwarded-For": address}, timeout=60)


def test_uploads_are_bounded_per_client_and_in_all(guarded):
    url, log, uploads = guarded
    before = files_under(uploads)
    small = [upload(url, "10.9.9.1", EXAMPLE.read_bytes() + bytes([i])) for i in range(5)]
    assert [r.status_code for r in small] == [200, 200, 200, 413, 413]
    assert "uploaded 3 files in the last 30 minutes (at most 3)" in small[3].text
    results = {}

    def bomb(k):  # four clients at once, each just under its own 1 MiB
        results[k] = [upload(url, f"10.9.9.{k}", bytes([k * 10 + i]) * int(0.8 * 2**20)) for i in range(2)]

    threads = [threading.Thread(target=bomb, args=(k,)) for k in range(2, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = [[r.status_code for r in rs] for rs in results.values()]
    assert all(c[1] == 413 for c in codes) and sum(c[0] == 200 for c in codes) == 3, codes
    texts = " ".join(r.text for rs in results.values() for r in rs)
    assert "at most 1 MiB per person" in texts and "space for uploads is full right now (3 MiB" in texts
    added = {p: size for p, size in files_under(uploads).items() if p not in before}
    assert len(added) == 3 + 3 and sum(added.values()) < 3 * 2**20
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def class_app(tmp_path_factory):
    """The app with its default bounds, behind a (pretended) proxy: a class and a stranger."""
    process, url, log, _ = launch(tmp_path_factory, ECOFLAP_BEHIND_PROXY="1")
    yield url, log
    process.terminate()
    process.wait(timeout=30)


def test_the_soak_replays_the_attacks_next_to_students(class_app, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    url, log = class_app
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, "-m", "ecoflap", "soak", "--url", url, "--users", "2", "--minutes", "0.5",
                           "--attacker", "--stats-key", STATS_KEY, "--json", str(out)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["leaks"] == result["silent_losses"] == result["changed_full_answers"] == 0
    assert result["attacker"]["refused"] > 0 and result["attacker"]["uncalm"] == 0, result["attacker"]
    assert result["students_refused"] == 0 and result["prune_seconds"]["n"] > 0
    assert "attacker:" in done.stdout and "students' prunes served" in done.stdout
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def queue_app(tmp_path_factory):
    """The app with room for three requests of one client in gradio's queue."""
    process, url, log, _ = launch(tmp_path_factory, ECOFLAP_BEHIND_PROXY="1", ECOFLAP_MAX_QUEUED_PER_CLIENT="3")
    yield url, log
    process.terminate()
    process.wait(timeout=30)


def post(url: str, api: str, data: list, address: str) -> httpx.Response:
    """Only the POST of the raw /call API: the request takes its place in the queue (or is refused)."""
    body = {"data": data, "session_hash": uuid.uuid4().hex}
    return httpx.post(f"{url.rstrip('/')}/gradio_api/call/{api}", content=json.dumps(body), timeout=60,
                      headers={"X-Forwarded-For": address, "content-type": "application/json"})


def test_one_client_cannot_fill_the_web_queue(queue_app):
    """The job bounds act inside a handler, once the request's turn has come; before this
    bound one client's asks and comparisons, from as many sessions as it liked, took every
    place in gradio's queue while the model was busy. Now its fourth is refused at the door."""
    url, log = queue_app
    image = {"path": str(EXAMPLE)}
    ask, compare = ("ask", [image, ""]), ("compare", [["wanda", "magnitude"], 0.5, None, ""])
    holder = visitor(url, "10.0.0.1")
    for _ in range(3):  # a prune holds the model while the stranger posts (a fast machine may need another)
        job = holder.submit("ecoflap_zeroth", 0.5, api_name="/prune", samples=128, stage1_samples=128)
        wait_for_progress(job)
        answers = [post(url, api, data, "10.6.6.6") for api, data in [ask, compare, ask, ask, compare, ask, ask]]
        someone_else = post(url, *ask, "10.0.0.2")
        if not job.done():  # the model was busy throughout: none of the stranger's requests could finish
            break
    else:
        pytest.fail("the prune that holds the model finished before eight requests were posted, three times")
    codes = [r.status_code for r in answers]
    assert codes == [200] * 3 + [503] * 4, codes
    refused = {r.json()["detail"] for r in answers[3:]}
    assert refused == {"You already have 3 requests waiting or running here (at most 3 per person): wait for "
                       "them to finish."}, refused
    assert someone_else.status_code == 200  # the stranger's bound is its own
    assert "ECoFLaP (zeroth-order) @ 0.50" in job.result()[0]  # the holder's own prune, unharmed
    assert "Traceback" not in log.read_text()
