"""One shared model: runs swapped in per unit of work, the full model never changes,
compact runs are exact, cancellation stores nothing, answers go before waiting prunes."""

import threading

import numpy as np
import pytest
import torch

from ecoflap.answers import ask
from ecoflap.anatomy import INCLUDE_CHOICES, prunable_layers
from ecoflap.options import PruneOptions
from ecoflap.pipeline import prune
from ecoflap.weights import RunWeights, WeightStore
from ecoflap.workbench import Cancelled, Workbench

from conftest import tiny_model, wait_for

OPTS = PruneOptions(samples=8, stage1_samples=8)


def _full_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, state):
    return all(torch.equal(p, state[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("method,kind", [("magnitude", "masks"), ("wanda", "masks"), ("ecoflap_zeroth", "masks"),
                                         ("sparsegpt", "dense")])
def test_a_stored_run_is_exactly_the_pruned_model_and_compact(examples, method, kind):
    loaded = tiny_model("opt")
    store = WeightStore.of(loaded.model)
    result = prune(loaded, method, 0.6, OPTS, examples)
    pruned = {layer.name: layer.module.weight.detach().clone()
              for layer in prunable_layers(loaded.model, INCLUDE_CHOICES)}
    run = RunWeights.capture(store, [r["name"] for r in result.layers])
    store.restore()
    assert set(getattr(run, kind)) == {r["name"] for r in result.layers}
    if kind == "masks":
        numel = sum(r["numel"] for r in result.layers)
        assert run.nbytes <= numel / 8 + len(result.layers)
    with run.applied(store):
        for name, weight in pruned.items():
            assert torch.equal(store.layers[name].weight, weight), name
    assert store.is_original()


def test_runs_are_isolated_and_full_model_never_changes(examples):
    bench = Workbench(tiny_model("opt"))
    before = _full_state(bench.loaded.model)
    images, questions = [e.image for e in examples[:3]], [e.question for e in examples[:3]]
    full = bench.ask(images, questions)
    a, a_weights, _ = bench.prune("magnitude", 0.9, OPTS, examples)
    bench.prune("wanda", 0.3, OPTS, examples)
    assert _same(bench.loaded.model, before)
    assert a.achieved_sparsity == pytest.approx(0.9, abs=1e-3)
    with a_weights.applied(bench.store):
        expected_a = ask(bench.loaded, images, questions)
    assert bench.ask(images, questions, a_weights) == expected_a
    assert bench.ask(images, questions) == full
    assert _same(bench.loaded.model, before)


def test_concurrent_users_each_get_their_own_run(examples):
    bench = Workbench(tiny_model("t5"))
    before = _full_state(bench.loaded.model)
    images, questions = [e.image for e in examples[:2]], ["", "what color is the circle?"]
    results, errors = {}, []

    def user(name, method, sparsity):
        try:
            _, weights, _ = bench.prune(method, sparsity, OPTS, examples)
            results[name] = (weights, [bench.ask(images, questions, weights) for _ in range(3)])
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
    for weights, answers in results.values():
        assert answers[0] == answers[1] == answers[2]
        with weights.applied(bench.store):
            assert ask(bench.loaded, images, questions) == answers[0]


def test_a_stop_ends_the_prune_within_a_block_and_frees_the_model(examples):
    bench = Workbench(tiny_model("opt"))
    before = _full_state(bench.loaded.model)
    seen = []

    def stop_after_some():
        seen.append(1)
        return len(seen) > 3

    with pytest.raises(Cancelled):
        bench.prune("wanda", 0.5, OPTS, examples, should_stop=stop_after_some)
    assert len(seen) == 4
    assert _same(bench.loaded.model, before)
    with bench.unit(long=True):
        pass


def test_a_job_stopped_while_waiting_never_runs(examples):
    bench = Workbench(tiny_model("opt"))
    hold, release = threading.Event(), threading.Event()

    def slow(what, done, total):
        hold.set()
        release.wait(30)

    first = threading.Thread(target=bench.prune, args=("wanda", 0.5, OPTS, examples, slow))
    first.start()
    hold.wait(30)
    stopped = threading.Event()
    outcome = []

    def second():
        try:
            bench.prune("magnitude", 0.5, OPTS, examples, progress=lambda *a: outcome.append("ran"),
                        should_stop=stopped.is_set)
        except Cancelled:
            outcome.append("cancelled")

    waiter = threading.Thread(target=second)
    waiter.start()
    stopped.set()
    waiter.join(30)
    release.set()
    first.join(30)
    assert outcome == ["cancelled"]


def test_an_answer_waits_for_the_prune_in_progress_only(examples):
    """Prune A holds the model; prunes B and C wait; an answer asked now runs as soon as A
    ends, before B and C (the order is recorded, not timed)."""
    bench = Workbench(tiny_model("opt"))
    order, hold, release = [], threading.Event(), threading.Event()

    def held(what, done, total):
        hold.set()
        release.wait(30)

    def prune_as(name, progress=None):
        bench.prune("magnitude", 0.5, OPTS, examples,
                    progress=progress or (lambda *a: order.append(name) if name not in order else None))
        order.append(f"{name} done")

    threads = [threading.Thread(target=prune_as, args=("A", held))]
    threads[0].start()
    hold.wait(30)
    for name in ("B", "C"):
        threads.append(threading.Thread(target=prune_as, args=(name,)))
        threads[-1].start()
    wait_for(lambda: bench.long_queue.waiting >= 2, what="two prunes to wait")

    def answer():
        bench.ask([examples[0].image], [""])
        order.append("answer")

    threads.append(threading.Thread(target=answer))
    threads[-1].start()
    wait_for(lambda: bench.model_lock.short_waiting >= 1, what="the answer to wait")
    release.set()
    for t in threads:
        t.join(60)
    assert order.index("answer") < order.index("B") and order.index("answer") < order.index("C")
    assert order.index("A done") < order.index("answer")


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


@pytest.mark.slow  # a soak: a hundred cycles
def test_hundred_prune_restore_cycles_are_bit_identical(examples):
    bench = Workbench(tiny_model("t5"))
    before = _full_state(bench.loaded.model)
    methods = ["magnitude", "wanda", "sparsegpt"]
    for i in range(100):
        bench.prune(methods[i % 3], 0.3 + 0.05 * (i % 10), PruneOptions(samples=4, batch_size=4), examples)
        assert bench.restore()
    assert _same(bench.loaded.model, before)
    assert len(bench.store.layers) == len(prunable_layers(bench.loaded.model, INCLUDE_CHOICES))


def test_full_weights_come_back_from_the_model_file_not_a_copy(saved_model, examples):
    from ecoflap.models import load_model

    loaded = load_model(str(saved_model), device="cpu")
    store = WeightStore.of(loaded)
    assert store.copied_bytes == 0 and len(store.in_file) == len(store.layers)
    before = _full_state(loaded.model)
    for method in ("magnitude", "sparsegpt"):
        prune(loaded, method, 0.7, OPTS, examples)
        assert not store.is_original()
        store.restore()
        assert _same(loaded.model, before)


def test_a_file_that_differs_from_the_loaded_weights_is_not_trusted(saved_model):
    from ecoflap.models import load_model

    loaded = load_model(str(saved_model), device="cpu")
    layer = prunable_layers(loaded.model)[0]
    with torch.no_grad():
        layer.module.weight.add_(1.0)
    store = WeightStore.of(loaded)
    assert layer.name in store.copies and layer.name not in store.in_file
    assert store.copied_bytes == layer.numel * 4


def test_a_runs_peak_memory_is_its_own(examples):
    """Memory the process held before the run (another user's upload, say) is not the run's."""
    loaded = tiny_model("opt")
    ballast = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, resident before the run
    result = prune(loaded, "magnitude", 0.5)
    assert result.peak_memory_kind == "cpu_rss_growth"
    assert result.peak_memory_bytes < 32 * 2**20
    del ballast


def test_long_units_take_turns_by_session():
    """Session x queued three units before y queued one: y goes second, not fourth."""
    from ecoflap.workbench import FairQueue

    queue, order = FairQueue(), []
    queue.acquire("holder")

    def unit(owner, name):
        queue.acquire(owner)
        order.append(name)
        queue.release()

    threads = []
    for owner, name in [("x", "x1"), ("x", "x2"), ("x", "x3"), ("y", "y1"), ("z", "z1"), ("x", "x4")]:
        threads.append(threading.Thread(target=unit, args=(owner, name)))
        threads[-1].start()
        wait_for(lambda: queue.waiting >= len(threads), what="each unit to wait its turn")
    queue.release()
    for t in threads:
        t.join(30)
    assert order == ["x1", "y1", "z1", "x2", "x3", "x4"]


def test_a_waiter_that_stops_leaves_the_turns_of_others_intact():
    from ecoflap.workbench import FairQueue

    queue, order, stop = FairQueue(), [], threading.Event()
    queue.acquire("holder")

    def unit(owner, name, should_stop=None):
        try:
            queue.acquire(owner, should_stop)
        except Cancelled:
            order.append(f"{name} stopped")
            return
        order.append(name)
        queue.release()

    threads = [threading.Thread(target=unit, args=("x", "x1", stop.is_set)),
               threading.Thread(target=unit, args=("x", "x2")), threading.Thread(target=unit, args=("y", "y1"))]
    for i, t in enumerate(threads):
        t.start()
        wait_for(lambda: queue.waiting >= i + 1, what="each unit to wait its turn")
    stop.set()
    threads[0].join(30)
    queue.release()
    for t in threads:
        t.join(30)
    assert order == ["x1 stopped", "x2", "y1"]
