"""One computation for a class: identical prunes of many sessions are computed once and
shared as a result, each session keeping a run of its own; uploads are never shared; one
waiter's Stop stops only its own wait."""

import threading

import pytest
import torch

import ecoflap.workbench as workbench_module
from ecoflap.workbench import Cancelled

from conftest import EXAMPLE, make_server, wait_for

FAST = dict(samples=8, stage1_samples=8)
pytestmark = pytest.mark.usefixtures("few_quality_questions")


class Gate:
    """The pipeline's prune, counted, and held at its start until released (or until the
    computation is asked to stop, which it then records)."""

    def __init__(self, monkeypatch):
        self.real = workbench_module.prune
        self.calls = 0
        self.stopped = 0
        self.release = threading.Event()
        monkeypatch.setattr(workbench_module, "prune", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        should_stop = args[7]
        while not self.release.wait(0.01):
            if should_stop is not None and should_stop():
                self.stopped += 1
                raise Cancelled("stopped by the user")
        return self.real(*args, **kwargs)


def in_threads(calls) -> tuple[list, list, list]:
    """Run each call in its own thread; returns (threads, results, errors) in the calls' order."""
    results, errors = [None] * len(calls), [None] * len(calls)

    def work(i, call):
        try:
            results[i] = call()
        except Exception as err:
            errors[i] = err

    threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    return threads, results, errors


def masks(run) -> dict:
    return {name: run.weights.mask(name) for name in run.weights.masks}


def test_sessions_asking_the_same_prune_at_once_share_one_computation(model_folder, tmp_path, monkeypatch):
    gate = Gate(monkeypatch)
    server = make_server(model_folder, tmp_path)
    sessions = [server.open_session() for _ in range(5)]
    threads, runs, errors = in_threads([lambda s=s: s.prune("wanda", 0.5, **FAST) for s in sessions])
    wait_for(lambda: server.flights.shared == 4, 60, "every session to join the computation")
    gate.release.set()
    for t in threads:
        t.join(120)
    assert errors == [None] * 5 and gate.calls == 1 and server.flights.computations == 1
    assert len({r.id for r in runs}) == 5 and all(r.label == "Wanda @ 0.50" for r in runs)
    for s, run in zip(sessions, runs):
        assert [r.id for r in s.runs()] == [run.id]
    # the same masks as a prune computed on its own, by a server that shares nothing with this one
    alone = make_server(model_folder, tmp_path / "alone").open_session().prune("wanda", 0.5, **FAST)
    assert gate.calls == 2
    expected = masks(alone)
    assert all(masks(r).keys() == expected.keys() and all(torch.equal(masks(r)[n], expected[n]) for n in expected)
               for r in runs)
    # the weights are held once, however many runs share them
    assert server.stored_run_bytes == runs[0].weights.nbytes
    # isolation: no session reaches another's run; deleting one keeps the others
    for other in runs[1:]:
        with pytest.raises(KeyError, match="no run with that id"):
            sessions[0].run(other.id)
        with pytest.raises(KeyError):
            sessions[0].export(other.id)
    assert sessions[0].clear_runs() == 1 and sessions[0].runs() == []
    assert [r["run"] for r in sessions[1].ask(str(EXAMPLE), "").runs] == [runs[1].id]
    assert all([r.id for r in s.runs()] == [run.id] for s, run in zip(sessions[1:], runs[1:]))
    assert server.stored_run_bytes == runs[0].weights.nbytes
    assert sessions[1].restore()


def test_a_finished_result_is_reused_while_a_run_holds_it(model_folder, tmp_path, monkeypatch):
    gate = Gate(monkeypatch)
    gate.release.set()
    server = make_server(model_folder, tmp_path)
    a, b, c = (server.open_session() for _ in range(3))
    first = a.prune("magnitude", 0.4)
    second = b.prune("magnitude", 0.4)
    assert gate.calls == 1 and second.id != first.id and second.weights is first.weights
    assert b.prune("magnitude", 0.4, modules=["vision"]) and gate.calls == 2  # other options: computed
    assert b.prune("magnitude", 0.45) and gate.calls == 3  # another sparsity: computed
    a.clear_runs()
    b.clear_runs()
    third = c.prune("magnitude", 0.4)  # nobody holds it any more: computed again
    assert gate.calls == 4 and third.weights is not first.weights


def test_shared_weights_count_once_against_the_memory_bound(model_folder, tmp_path):
    probe = make_server(model_folder, tmp_path / "probe")
    one = probe.open_session().prune("sparsegpt", 0.5, **FAST).weights.nbytes
    server = make_server(model_folder, tmp_path, run_memory_mb=1.5 * one / 2**20)
    sessions = [server.open_session() for _ in range(4)]
    runs = [s.prune("sparsegpt", 0.5, **FAST) for s in sessions]
    assert all(s.notices() == [] and [r.id for r in s.runs()] == [run.id] for s, run in zip(sessions, runs))
    assert server.stored_run_bytes == one
    newcomer = server.open_session()
    newcomer.prune("sparsegpt", 0.6, **FAST)  # other weights: the four runs that share the oldest go together
    assert all(s.runs() == [] and "memory for stored runs" in s.notices()[0] for s in sessions)
    assert server.stored_run_bytes <= 1.5 * one


def test_a_prune_calibrated_on_uploads_is_never_shared(model_folder, tmp_path, monkeypatch):
    gate = Gate(monkeypatch)
    gate.release.set()
    server = make_server(model_folder, tmp_path)
    a, b = server.open_session(), server.open_session()
    pictures = [str(EXAMPLE)] * 4
    first = a.prune("wanda", 0.5, calibration_images=pictures, **FAST)
    second = b.prune("wanda", 0.5, calibration_images=pictures, **FAST)
    assert gate.calls == 2 and second.weights is not first.weights
    assert first.shared is None and second.shared is None
    assert server.flights.computations == 0 and server.flights.shared == 0


def two_waiting_for_one_prune(model_folder, tmp_path, monkeypatch):
    """Two sessions asking for the same prune, both waiting for its one computation (held
    at its gate): (gate, server, a, b, threads, runs, errors)."""
    gate = Gate(monkeypatch)
    server = make_server(model_folder, tmp_path)
    a, b = server.open_session(), server.open_session()
    threads, runs, errors = in_threads([lambda: a.prune("wanda", 0.6, **FAST), lambda: b.prune("wanda", 0.6, **FAST)])
    wait_for(lambda: server.flights.shared == 1, 60, "both sessions to wait for one computation")
    return gate, server, a, b, threads, runs, errors


def test_one_waiters_stop_leaves_the_computation_to_the_others(model_folder, tmp_path, monkeypatch):
    gate, server, a, b, threads, runs, errors = two_waiting_for_one_prune(model_folder, tmp_path, monkeypatch)
    assert a.stop() == 1
    threads[0].join(60)  # a's Stop returns while the computation is still held at its gate
    assert not threads[0].is_alive() and isinstance(errors[0], Cancelled) and not gate.release.is_set()
    assert gate.stopped == 0 and a.runs() == []
    gate.release.set()
    threads[1].join(120)
    assert errors[1] is None and [r.id for r in b.runs()] == [runs[1].id] and gate.calls == 1
    assert a.runs() == [] and a.restore()


def test_the_last_waiters_stop_stops_the_computation(model_folder, tmp_path, monkeypatch):
    gate, server, a, b, threads, runs, errors = two_waiting_for_one_prune(model_folder, tmp_path, monkeypatch)
    a.stop()
    threads[0].join(60)
    assert gate.stopped == 0
    b.stop()
    threads[1].join(60)
    assert all(isinstance(e, Cancelled) for e in errors)
    wait_for(lambda: gate.stopped == 1, 60, "the computation to stop")
    assert server.stored_run_bytes == 0 and server.flights.in_progress == 0
    gate.release.set()
    again = a.prune("wanda", 0.6, **FAST)  # a fresh computation, not the stopped one
    assert gate.calls == 2 and [r.id for r in a.runs()] == [again.id] and a.restore()


def test_compare_reuses_the_sessions_identical_runs_and_shares_across_sessions(model_folder, tmp_path, monkeypatch):
    gate = Gate(monkeypatch)
    gate.release.set()
    server = make_server(model_folder, tmp_path)
    me, other = server.open_session(), server.open_session()
    pruned = me.prune("wanda", 0.6)  # the page's defaults are the comparison's settings
    first = me.compare(["wanda", "magnitude"], 0.6, eval_n=10)
    assert gate.calls == 2 and first.runs[0].id == pruned.id
    second = me.compare(["magnitude", "wanda"], 0.6, eval_n=10)
    assert gate.calls == 2 and [r.id for r in second.runs] == [first.runs[1].id, pruned.id]
    assert sorted(r.label for r in me.runs()) == ["Magnitude @ 0.60", "Wanda @ 0.60"]
    theirs = other.compare(["wanda", "magnitude"], 0.6, eval_n=10)  # another session: its own runs, no computation
    assert gate.calls == 2 and {r.id for r in theirs.runs}.isdisjoint(r.id for r in me.runs())
    # the reused run is scored on the comparison's questions, as a fresh one is
    fresh = make_server(model_folder, tmp_path / "fresh").open_session().compare(["wanda", "magnitude"], 0.6, eval_n=10)
    assert [r["score"] for r in first.rows] == [r["score"] for r in fresh.rows] == [r["score"] for r in theirs.rows]
    assert [r["score"] for r in second.rows] == [fresh.rows[0]["score"], fresh.rows[2]["score"], fresh.rows[1]["score"]]


def test_a_default_left_unset_and_the_same_value_typed_share_one_computation(model_folder, tmp_path, monkeypatch):
    """The Prune tab sends every default as its value (cap 0.6, 8 stage-1 samples here, the
    vision sparsity as the target) where an API client sends 0 or nothing: one computation.
    An option the method never reads does not split it either; one it reads does."""
    gate = Gate(monkeypatch)
    gate.release.set()
    server = make_server(model_folder, tmp_path)
    a, b, c = (server.open_session() for _ in range(3))
    first = a.prune("ecoflap_zeroth", 0.5, samples=8, stage1_samples=8, max_sparsity=0)
    typed = b.prune("ecoflap_zeroth", 0.5, samples=8, stage1_samples=8, max_sparsity=0.6, owl_m=7,
                    vision_sparsity="0.3")
    assert gate.calls == 1 and typed.weights is first.weights
    assert c.prune("ecoflap_zeroth", 0.5, samples=8, stage1_samples=8, max_sparsity=0.55) and gate.calls == 2
    split = a.prune("per_modality", 0.5, samples=8, vision_sparsity="")
    assert b.prune("per_modality", 0.5, samples=8, vision_sparsity="0.50").weights is split.weights
    assert gate.calls == 3
    assert c.prune("per_modality", 0.5, samples=8, vision_sparsity="0.4") and gate.calls == 4
