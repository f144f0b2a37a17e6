"""Runs per user on one shared model: isolation, bounded memory, cancellation, restore."""

import threading

import pytest
import torch

from ecoflap.anatomy import INCLUDE_CHOICES, prunable_layers
from ecoflap.answers import ask
from ecoflap.options import PruneOptions
from ecoflap.workbench import Cancelled, Workbench

from conftest import tiny_model

OPTS = PruneOptions(samples=8, stage1_samples=8)


def _full_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, state):
    return all(torch.equal(p, state[n]) for n, p in model.named_parameters())


def test_runs_are_isolated_and_full_model_never_changes(examples):
    bench = Workbench(tiny_model("opt"))
    before = _full_state(bench.loaded.model)
    images, questions = [e.image for e in examples[:3]], [e.question for e in examples[:3]]
    full = bench.ask(images, questions)
    a, _ = bench.prune("magnitude", 0.9, OPTS, examples)
    bench.prune("wanda", 0.3, OPTS, examples)
    assert _same(bench.loaded.model, before)
    assert a.result.achieved_sparsity == pytest.approx(0.9, abs=1e-3)
    # a run's answers come from its own weights: compare with pruning the model directly
    bench.store.load(a.weights)
    expected_a = ask(bench.loaded, images, questions)
    bench.store.restore()
    assert bench.ask(images, questions, a.id) == expected_a
    assert bench.ask(images, questions) == full
    assert _same(bench.loaded.model, before)


def test_concurrent_users_each_get_their_own_run(examples):
    bench = Workbench(tiny_model("t5"))
    before = _full_state(bench.loaded.model)
    images, questions = [e.image for e in examples[:2]], ["", "what color is the circle?"]
    results, errors = {}, []

    def user(name, method, sparsity):
        try:
            run, _ = bench.prune(method, sparsity, OPTS, examples)
            results[name] = (run, [bench.ask(images, questions, run.id) for _ in range(3)])
        except Exception as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=user, args=(f"u{i}", m, s))
               for i, (m, s) in enumerate([("magnitude", 0.8), ("wanda", 0.5), ("sparsegpt", 0.6), ("magnitude", 0.2)])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _same(bench.loaded.model, before)
    for run, answers in results.values():
        assert answers[0] == answers[1] == answers[2]
        bench.store.load(run.weights)
        assert ask(bench.loaded, images, questions) == answers[0]
        bench.store.restore()


def test_stored_runs_are_bounded_oldest_first(examples):
    bench = Workbench(tiny_model("opt"), max_runs=2)
    first, dropped = bench.prune("magnitude", 0.5, OPTS)
    assert dropped == []
    second, _ = bench.prune("magnitude", 0.6, OPTS)
    third, dropped = bench.prune("magnitude", 0.7, OPTS)
    assert [d.id for d in dropped] == [first.id]
    assert bench.get(first.id) is None and bench.get(third.id) is not None
    with pytest.raises(KeyError, match="no longer stored"):
        bench.ask([examples[0].image], [""], first.id)
    by_bytes = Workbench(tiny_model("opt"), max_runs=10, max_bytes=second.nbytes + 1)
    by_bytes.prune("magnitude", 0.5, OPTS)
    _, dropped = by_bytes.prune("magnitude", 0.6, OPTS)
    assert len(dropped) == 1 and len(by_bytes.runs) == 1


def test_cancel_restores_and_releases_the_lock(examples):
    bench = Workbench(tiny_model("opt"))
    before = _full_state(bench.loaded.model)
    calls = {"n": 0}

    def stop_after_some():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        bench.prune("wanda", 0.5, OPTS, examples, should_stop=stop_after_some)
    assert _same(bench.loaded.model, before)
    assert bench.lock.acquire(timeout=1)
    bench.lock.release()
    assert bench.runs == {}


def test_out_of_memory_mid_prune_restores_and_says_so(examples, monkeypatch):
    bench = Workbench(tiny_model("opt"))
    before = _full_state(bench.loaded.model)
    import ecoflap.pipeline as pipeline

    real = pipeline.prune_wanda
    count = {"n": 0}

    def flaky(*args, **kwargs):
        count["n"] += 1
        if count["n"] == 5:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "prune_wanda", flaky)
    with pytest.raises(MemoryError, match="full model restored"):
        bench.prune("wanda", 0.5, OPTS, examples)
    assert _same(bench.loaded.model, before)


def test_hundred_prune_restore_cycles_are_bit_identical(examples):
    bench = Workbench(tiny_model("t5"), max_runs=2)
    before = _full_state(bench.loaded.model)
    methods = ["magnitude", "wanda", "sparsegpt"]
    for i in range(100):
        bench.prune(methods[i % 3], 0.3 + 0.05 * (i % 10), PruneOptions(samples=4, batch_size=4), examples)
        assert bench.restore()
    assert _same(bench.loaded.model, before)
    assert len(bench.store.layers) == len(prunable_layers(bench.loaded.model, INCLUDE_CHOICES))
