"""A deployment shared by many sessions: ownership, quotas, notices, stops, loads, exports,
limits, and one clear message for each bad value a stranger can send."""

import csv
import io
import json
import shutil
import threading
import time

import pytest
import torch

from ecoflap.models import ModelLoadError
from ecoflap.serve.server import Busy, ConfigError, Limits, client_address
from ecoflap.serve.session import Session
from ecoflap.workbench import Cancelled

from conftest import EXAMPLE, make_server, tiny_model, wait_for

FAST = dict(samples=8, stage1_samples=8)
pytestmark = pytest.mark.usefixtures("few_quality_questions")


@pytest.fixture(scope="module")
def one_run(shared_model_folder, tmp_path_factory, few_quality_questions):
    """A session holding one run, shared by the refusal tests: each refusal must leave it so."""
    me = make_server(shared_model_folder, tmp_path_factory.mktemp("deployment")).open_session()
    return me, me.prune("magnitude", 0.5)


def test_sessions_see_only_their_own_runs_and_ids_reach_nothing_else(model_folder, tmp_path):
    server = make_server(model_folder, tmp_path)
    a, b = server.open_session(), server.open_session()
    run_a = a.prune("magnitude", 0.5)
    run_b = b.prune("wanda", 0.3, **FAST)
    assert [r.id for r in a.runs()] == [run_a.id] and [r.id for r in b.runs()] == [run_b.id]
    for guessed in (run_a.id, "run1", run_a.id[:-1], None, 3, ["x"]):
        with pytest.raises(KeyError, match="no run with that id"):
            b.run(guessed)
        with pytest.raises(KeyError):
            b.export(guessed)
        if guessed is not None:
            with pytest.raises(KeyError):
                b.distributions(guessed)
    answers = b.ask(str(EXAMPLE), "")
    assert [r["run"] for r in answers.runs] == [run_b.id]


def test_run_ids_are_unguessable_and_never_reused(model_folder, tmp_path):
    server = make_server(model_folder, tmp_path, runs_per_session=2)
    me = server.open_session()
    ids = [me.prune("magnitude", 0.1 + 0.01 * i).id for i in range(12)]
    assert len(set(ids)) == 12 and all(len(i) >= 16 for i in ids)
    assert len({i[:10] for i in ids}) > 1


def test_a_model_loaded_again_never_shows_a_stale_run(model_folder, tmp_path):
    """The old bug: run ids restarted when a model was loaded again, so a stale id pointed
    at somebody else's run."""
    other = tmp_path / "other"
    shutil.copytree(model_folder, other)
    server = make_server(model_folder, tmp_path, max_models=2, allow_local_models=True)
    a, b = server.open_session(), server.open_session()
    a.load_model(str(other))
    stale = a.prune("magnitude", 0.5).id
    b.load_model(str(tmp_path / "nothing-here") if False else str(other))
    third = tmp_path / "third"
    shutil.copytree(model_folder, third)
    server.open_session().load_model(str(third))  # unloads `other`
    notes = a.notices()
    assert any("unloaded to make room" in n for n in notes)
    assert a.model_name == server.default_model and a.runs() == []
    b.load_model(str(other))
    fresh = b.prune("magnitude", 0.6).id
    assert fresh != stale
    with pytest.raises(KeyError):
        a.run(stale)
    with pytest.raises(KeyError):
        b.run(stale)


def test_with_room_for_one_model_another_is_refused_and_the_default_kept(model_folder, tmp_path):
    """The old bug: with ECOFLAP_MAX_MODELS=1 "Load another model" said "Loaded" and then
    unloaded that very model (the eviction picked the newcomer)."""
    other = tmp_path / "other"
    shutil.copytree(model_folder, other)
    server = make_server(model_folder, tmp_path, max_models=1, allow_local_models=True)
    me = server.open_session()
    run = me.prune("magnitude", 0.5)
    with pytest.raises(PermissionError, match="keeps one model in memory: tiny-opt only"):
        me.load_model(str(other))
    assert [b.loaded.name for b in server.models.loaded()] == ["tiny-opt"]
    assert me.model_name == server.default_model and [r.id for r in me.runs()] == [run.id]


def test_the_model_just_loaded_is_never_the_one_unloaded(model_folder, tmp_path):
    """Room for two: the default stays, the newcomer stays, the other one goes."""
    server = make_server(model_folder, tmp_path, max_models=2, allow_local_models=True)
    folders = [tmp_path / "second", tmp_path / "third"]
    for folder in folders:
        shutil.copytree(model_folder, folder)
    me = server.open_session()
    for folder in folders:
        assert me.load_model(str(folder)).startswith("Loaded")
        assert server.models.current(str(folder)) is not None and me.model_name == str(folder)
    assert [n for n in (str(model_folder), *map(str, folders)) if server.models.current(n)] == \
        [str(model_folder), str(folders[1])]


def test_each_session_has_its_own_quota(model_folder, tmp_path):
    server = make_server(model_folder, tmp_path, runs_per_session=2)
    a, b = server.open_session(), server.open_session()
    kept = a.prune("magnitude", 0.5)
    for s in (0.1, 0.2, 0.3):
        b.prune("magnitude", s)
    assert [r.id for r in a.runs()] == [kept.id] and a.notices() == []
    assert len(b.runs()) == 2
    told = b.notices()
    assert len(told) == 1 and "Magnitude @ 0.10" in told[0] and "at most 2 runs" in told[0]


def test_the_shared_memory_bound_tells_the_owner_only(model_folder, tmp_path):
    probe = make_server(model_folder, tmp_path)
    one = probe.open_session().prune("sparsegpt", 0.5, **FAST).weights.nbytes
    server = make_server(model_folder, tmp_path, run_memory_mb=1.5 * one / 2**20)
    a, b = server.open_session(), server.open_session()
    victim = a.prune("sparsegpt", 0.5, **FAST)
    b.prune("sparsegpt", 0.6, **FAST)
    assert a.runs() == []
    told = a.notices()
    assert len(told) == 1 and victim.label in told[0] and "memory for stored runs" in told[0]
    assert b.notices() == []
    assert server.stored_run_bytes <= 1.5 * one


def test_stop_and_ending_a_session_store_nothing(model_folder, tmp_path):
    server = make_server(model_folder, tmp_path)
    me = server.open_session()
    started = threading.Event()

    def progress(what, done, total):
        started.set()
        time.sleep(0.05)

    errors = []

    def job():
        try:
            me.prune("ecoflap_zeroth", 0.5, progress=progress, **FAST)
        except Cancelled as err:
            errors.append(err)

    thread = threading.Thread(target=job)
    thread.start()
    started.wait(30)
    me.stop()
    thread.join(60)
    assert errors and me.runs() == [] and server.stored_run_bytes == 0
    assert me.restore()


def test_loading_a_model_blocks_nobody_else(model_folder, tmp_path, monkeypatch):
    import ecoflap.serve.server as server_module

    server = make_server(model_folder, tmp_path, allow_local_models=True)
    loading, release = threading.Event(), threading.Event()
    real = server_module.load_model

    def slow_load(*args, **kwargs):
        loading.set()
        release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(server_module, "load_model", slow_load)
    other = tmp_path / "other"
    shutil.copytree(model_folder, other)
    loader = threading.Thread(target=lambda: server.open_session().load_model(str(other)))
    loader.start()
    loading.wait(30)
    me = server.open_session()
    answers = me.ask(str(EXAMPLE), "")
    run = me.prune("magnitude", 0.5)
    assert answers.full is not None and run.id
    assert loader.is_alive()
    release.set()
    loader.join(60)


def test_public_deployments_load_hub_ids_only(model_folder, tmp_path):
    server = make_server(model_folder, tmp_path)
    me = server.open_session()
    for name, message in [("/etc", "from the Hugging Face hub by id"), (str(model_folder.parent), "hub by id"),
                          ("x" * 5000, "at most 200 characters"), ("", "type a hub id"), (None, "type a hub id")]:
        with pytest.raises((PermissionError, ValueError), match=message):
            me.load_model(name)
    allowlisted = make_server(model_folder, tmp_path, allowed_models=("org/model",))
    with pytest.raises(PermissionError) as refused:
        allowlisted.open_session().load_model("org/other")
    assert str(model_folder) not in str(refused.value) and "tiny-opt" in str(refused.value)


def test_bad_model_folders_get_one_specific_line(model_folder, tmp_path):
    from ecoflap.models import load_model

    def variant(name):
        folder = tmp_path / name
        shutil.copytree(model_folder, folder)
        return folder

    truncated = variant("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    mismatch = variant("mismatch")
    config = json.loads((mismatch / "config.json").read_text())
    config["text_config"]["ffn_dim"] = 64
    (mismatch / "config.json").write_text(json.dumps(config))
    pickled = variant("pickled")
    state = tiny_model("opt").model.state_dict()
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    for folder, message in [(truncated, "truncated or corrupt"), (mismatch, "do not fit its config.json"),
                            (pickled, "pickle weights"), (bert, "not BLIP-2")]:
        with pytest.raises(ModelLoadError, match=message) as refused:
            load_model(str(folder), device="cpu")
        assert str(tmp_path) not in str(refused.value)


@pytest.mark.parametrize("settings,message", [
    (dict(sparsity="abc"), "sparsity must be a number from 0 to 0.95"),
    (dict(sparsity=None), "sparsity must be a number"),
    (dict(sparsity=0.99), "from 0 to 0.95"),
    (dict(sparsity=float("nan")), "sparsity must be a number"),
    (dict(method=["wanda"]), "unknown method"),
    (dict(method="x" * 500), "unknown method"),
    (dict(eps=1e300), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(eps=float("inf")), "eps"),
    (dict(eps="1e-3x"), "eps"),
    (dict(method="wanda", nm="2:4", sparsity=0.3), "set the sparsity to 0.50"),
    (dict(method="wanda", nm=24), "N:M must be text"),
    (dict(samples="many"), "calibration samples must be a whole number"),
    (dict(samples=2.5), "whole number"),
    (dict(batch_size=10_000), "batch size"),
    (dict(modules="vision"), "modules must be a list"),
    (dict(modules=["vision", "eyes"]), "each module set must be one of"),
    (dict(modules=[]), "at least one module set"),
    (dict(granularity="row"), "granularity must be one of"),
    (dict(max_sparsity=0.3), "below the target"),
])
def test_bad_prune_values_get_one_specific_message_and_change_nothing(one_run, settings, message):
    me, kept = one_run
    call = {"method": "ecoflap_zeroth", "sparsity": 0.5, **settings}
    with pytest.raises(ValueError, match=message):
        me.prune(call.pop("method"), call.pop("sparsity"), **call)
    assert [r.id for r in me.runs()] == [kept.id]
    assert me.restore()


def test_projection_only_pruning_is_called_projection(model_folder, tmp_path):
    me = make_server(model_folder, tmp_path).open_session()
    run = me.prune("magnitude", 0.5, modules=["projection"])
    assert set(run.result.sparsity_by_modality) == {"projection"}
    assert {r["modality"] for r in run.result.layers} == {"projection"}


@pytest.mark.parametrize("sparsities,message", [
    ("0.5,,0.6", "an entry is empty"), ("-0", "plain decimal"), ("1e-400", "plain decimal"),
    ("0.5,0.5", "only once"), ("0.96", "from 0 to 0.95"), ("abc", "plain decimal"), ("", "an entry is empty"),
    ("0.1,0.2,0.3,0.4", "at most 3 points"), (None, "sparsities must be"),
])
def test_sweep_lists_are_checked(model_folder, tmp_path, sparsities, message):
    me = make_server(model_folder, tmp_path, sweep_points=3).open_session()
    with pytest.raises(ValueError, match=message):
        me.sweep(["wanda"], sparsities)


def test_a_sweep_is_capped_in_points(model_folder, tmp_path):
    me = make_server(model_folder, tmp_path, sweep_points=3).open_session()
    with pytest.raises(ValueError, match="at most 3 points"):
        me.sweep(["wanda", "magnitude"], "0.1,0.2")
    rows = me.sweep(["magnitude"], "0.2,0.4", eval_n=10)
    assert [r["sparsity"] for r in rows] == [0.2, 0.4] and me.runs() == []
    # the export holds every point's figures against the full model, as measured
    written = {p.suffix: p for p in me.export_table("sweep", rows)}
    table = list(csv.DictReader(io.StringIO(written[".csv"].read_text())))
    for key in ("kl_mean", "kl_median", "kl_p99", "kl_p999", "same_top", "same_answer", "accuracy", "full_accuracy",
                "right_to_wrong", "wrong_to_right"):
        assert [float(r[key]) for r in table] == pytest.approx([row[key] for row in rows]), key
    assert json.loads(written[".json"].read_text())["rows"] == rows


@pytest.mark.parametrize("call,message", [
    (lambda me: me.ask(str(EXAMPLE), 42), "question must be text"),
    (lambda me: me.ask(str(EXAMPLE), ["q"]), "question must be text"),
    (lambda me: me.ask(None, ""), "upload an image"),
    (lambda me: me.ask(str(EXAMPLE), "", max_new_tokens=10_000), "new tokens"),
    (lambda me: me.compare(["wanda"], 0.5), "two to four"),
    (lambda me: me.compare(["wanda", "wanda"], 0.5), "two to four"),
    (lambda me: me.compare(["wanda", "magnitude"], 0.99), "from 0 to 0.95"),
    (lambda me: me.compare(["wanda", "magnitude"], "high"), "sparsity must be a number"),
    (lambda me: me.export("nope", True), "no run with that id"),
])
def test_other_bad_values_get_specific_messages(model_folder, tmp_path, call, message):
    me = make_server(model_folder, tmp_path).open_session()
    with pytest.raises((ValueError, KeyError), match=message):
        call(me)


def test_exports_are_named_after_the_run_bounded_and_deleted_with_the_session(model_folder, tmp_path):
    server = make_server(model_folder, tmp_path)
    me = server.open_session()
    run = me.prune("wanda", 0.7, **FAST)
    first = me.export(run.id)
    assert [p.name for p in first] == ["wanda-0.70.report.json", "wanda-0.70.layers.csv"]
    second = me.export(run.id, True)
    assert not first[0].exists() and second[-1].name == "wanda-0.70.model.zip"
    assert json.loads(second[0].read_text())["model"] == "tiny-opt"
    server.close_session(me.id, "the page was closed")
    assert not any(p.exists() for p in second)
    assert server.stored_run_bytes == 0


def test_model_export_refused_before_anything_is_written(model_folder, tmp_path):
    server = make_server(model_folder, tmp_path, allow_model_export=False)
    me = server.open_session()
    run = me.prune("magnitude", 0.5)
    with pytest.raises(PermissionError, match="turned off"):
        me.export(run.id, True)
    assert list((tmp_path / "exports").rglob("*")) == []


def test_idle_sessions_and_old_exports_are_tidied(model_folder, tmp_path):
    server = make_server(model_folder, tmp_path, session_idle_minutes=1, export_minutes=1)
    me = server.open_session()
    files = me.export(me.prune("magnitude", 0.5).id)
    me.last_used -= 120
    old = time.time() - 120
    for path in [files[0].parent, *files]:
        import os

        os.utime(path, (old, old))
    server.tidy(force=True)
    assert not files[0].exists() and server.sessions == 0
    again = server.session(me.id)
    assert any("idle for more than 1 minutes" in n for n in again.notices()) and again.runs() == []


def test_a_flood_of_empty_sessions_never_costs_anyone_their_runs(model_folder, tmp_path):
    server = make_server(model_folder, tmp_path, sessions=4, sessions_per_client=2)
    student = server.open_session("10.0.0.1")
    kept = student.prune("magnitude", 0.5)
    for _ in range(50):
        server.open_session("10.0.0.9")
    assert server.sessions == 3  # the student's, and the attacker's newest two
    assert [r.id for r in server.session(student.id, "10.0.0.1").runs()] == [kept.id]
    for address in ("10.0.0.2", "10.0.0.3"):
        server.open_session(address).prune("magnitude", 0.5)
    assert server.sessions == 4
    attacker = [s for s in list(server._sessions.values()) if s.client == "10.0.0.9"]
    assert len(attacker) == 1  # the room for the last student came from an empty session
    attacker[0].prune("magnitude", 0.5)
    with pytest.raises(Busy, match="serving as many people as it can \\(4 sessions"):
        server.open_session("10.0.0.4")
    with pytest.raises(Busy, match="serving as many people"):
        server.open_session("10.0.0.9")
    assert server.sessions == 4
    assert all(len(s.runs()) == 1 for s in server._sessions.values())


def test_one_client_keeps_at_most_its_own_bound_of_sessions(model_folder, tmp_path):
    server = make_server(model_folder, tmp_path, sessions=10, sessions_per_client=2)
    first, second = server.open_session("10.0.0.9"), server.open_session("10.0.0.9")
    first.prune("magnitude", 0.5)
    third = server.open_session("10.0.0.9")  # closes `second`, the one without runs
    assert server.sessions == 2 and second.ended and not first.ended
    third.prune("magnitude", 0.5)
    with pytest.raises(Busy, match="already have 2 sessions with work in them"):
        server.open_session("10.0.0.9")
    assert server.open_session("10.0.0.1") and server.sessions == 3
    again = server.session(second.id, "10.0.0.1")
    assert any("more than 2 sessions" in n for n in again.notices())


def test_the_client_address_trusts_forwarding_only_behind_a_proxy():
    assert client_address("10.1.1.1", "6.6.6.6", behind_proxy=False) == "10.1.1.1"
    assert client_address("10.1.1.1", "6.6.6.6, 7.7.7.7", behind_proxy=True) == "7.7.7.7"
    assert client_address("10.1.1.1", "", behind_proxy=True) == "10.1.1.1"
    assert client_address(None, None, behind_proxy=False) == "unknown"


@pytest.mark.parametrize("env,message", [
    ({"ECOFLAP_MAX_RUNS": "abc"}, "ECOFLAP_MAX_RUNS must be a whole number"),
    ({"ECOFLAP_MAX_RUN_MB": "lots"}, "ECOFLAP_MAX_RUN_MB must be a number"),
    ({"ECOFLAP_MAX_MODELS": "0"}, "at least 1"),
    ({"ECOFLAP_ALLOW_MODEL_EXPORT": "yes"}, "must be 0 or 1"),
    ({"ECOFLAP_MAX_SWEEP_POINTS": "nan"}, "ECOFLAP_MAX_SWEEP_POINTS must be a whole number"),
])
def test_bad_environment_values_are_named(env, message):
    with pytest.raises(ConfigError, match=message):
        Limits.from_environment(env)


def test_environment_limits_are_read():
    limits = Limits.from_environment({"ECOFLAP_MAX_RUNS": "3", "ECOFLAP_MAX_RUN_MB": "12.5",
                                      "ECOFLAP_ALLOWED_MODELS": "a/b, c/d", "ECOFLAP_ALLOW_MODEL_EXPORT": "0"})
    assert (limits.runs_per_session, limits.run_memory_mb, limits.allowed_models, limits.allow_model_export) == \
        (3, 12.5, ("a/b", "c/d"), False)


def test_a_notebook_session_does_everything_the_app_does(model_folder, tmp_path):
    me = make_server(model_folder, tmp_path).open_session()
    assert isinstance(me, Session)
    info = me.describe()
    assert info["name"] == "tiny-opt" and info["full_weights"].startswith("read back")
    comparison = me.compare(["wanda", "ecoflap_zeroth"], 0.5, str(EXAMPLE), "how many shapes are there?", eval_n=10)
    assert [r["label"] for r in comparison.rows] == ["Full model", "Wanda @ 0.50", "ECoFLaP (zeroth-order) @ 0.50"]
    assert "generated shapes questions (seed 1234" in comparison.measured_on and comparison.question
    assert len(me.runs()) == 2
    hist = me.distributions(me.runs()[0].id)
    assert set(hist["series"]) == {"full", "Wanda @ 0.50"}
    assert set(hist["series"]["full"]["weights"]) == {"vision", "language"}


def test_clearing_runs_frees_their_memory(model_folder, tmp_path):
    server = make_server(model_folder, tmp_path)
    me = server.open_session()
    me.prune("sparsegpt", 0.5, **FAST)
    me.prune("magnitude", 0.5)
    assert server.stored_run_bytes > 0
    assert me.clear_runs() == 2 and me.runs() == [] and server.stored_run_bytes == 0


def test_jobs_are_bounded_per_session_and_per_client(model_folder, tmp_path):
    server = make_server(model_folder, tmp_path, jobs_per_session=1, jobs_per_client=2)
    a, b, c = (server.open_session("10.0.0.9") for _ in range(3))
    other = server.open_session("10.0.0.1")
    holding, release = threading.Event(), threading.Event()

    def hold(what, done, total):
        holding.set()
        release.wait(30)

    first = threading.Thread(target=lambda: a.prune("magnitude", 0.5, progress=hold, **FAST))
    first.start()
    holding.wait(30)
    with pytest.raises(Busy, match="already have 1 job\\(s\\) running or waiting here \\(at most 1 per session"):
        a.prune("magnitude", 0.6, **FAST)
    second = threading.Thread(target=lambda: b.sweep(["magnitude"], "0.3", eval_n=10))
    second.start()
    wait_for(lambda: len(b._jobs) >= 1, what="the sweep to start")
    with pytest.raises(Busy, match="already have 2 jobs running or waiting \\(at most 2 per person"):
        c.compare(["magnitude", "wanda"], 0.5, eval_n=10)
    release.set()
    assert other.prune("magnitude", 0.5, **FAST).label == "Magnitude @ 0.50"
    first.join(60)
    second.join(60)
    assert len(a.runs()) == 1 and c.prune("magnitude", 0.5, **FAST)
