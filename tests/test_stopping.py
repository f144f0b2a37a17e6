"""Stopping is its own signal: a Stop asked in the middle of any long loop takes effect
before the next layer (or batch of questions), reported progress or not, and the model
keeps its full weights.

Each case lets one step of the loop run, presses Stop from inside that step (as a person
would while it runs), and counts how many steps ran in all: exactly one.
"""

import pytest
import torch

import ecoflap.allocation
import ecoflap.importance
import ecoflap.pipeline
import ecoflap.replay
import ecoflap.shapes.evaluate
from ecoflap.options import PruneOptions
from ecoflap.progress import Cancelled, prefixed, stop_if_asked
from ecoflap.sweep import measure_point
from ecoflap.workbench import Workbench

from conftest import tiny_model

OPTS = PruneOptions(samples=8, stage1_samples=8, batch_size=2)


class StopButton:
    """Pressed from inside the step being counted; counts the steps."""

    def __init__(self):
        self.pressed = False
        self.steps = 0

    def __call__(self) -> bool:
        return self.pressed

    def around(self, step):
        def counted(*args, **kwargs):
            self.steps += 1
            self.pressed = True
            return step(*args, **kwargs)

        return counted


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# (method, the module and function that is one step of its long loop)
LOOPS = [
    ("global_magnitude", ecoflap.allocation, "_count"),  # one layer of one bisection step
    ("magnitude", ecoflap.pipeline, "prune_magnitude"),
    ("wanda", ecoflap.pipeline, "prune_wanda"),
    ("sparsegpt", ecoflap.pipeline, "prune_sparsegpt"),  # reports no progress within a block
    ("owl", ecoflap.replay.Block, "input_statistics"),  # OWL's dense statistics, one block
    ("ecoflap_zeroth", ecoflap.importance, "unit_score"),  # one matrix, every batch
    ("ecoflap_first", ecoflap.importance, "calibration_loss"),  # one batch's backward pass
]


@pytest.mark.parametrize("method,owner,name", LOOPS, ids=[f"{m}-{n}" for m, _, n in LOOPS])
def test_a_stop_inside_a_long_loop_ends_it_within_one_step(examples, monkeypatch, method, owner, name):
    bench = Workbench(tiny_model("opt"))
    before = _state(bench.loaded.model)
    stop = StopButton()
    monkeypatch.setattr(owner, name, stop.around(getattr(owner, name)))
    with pytest.raises(Cancelled):
        bench.prune(method, 0.5, OPTS, examples, should_stop=stop)
    assert stop.steps == 1
    assert all(torch.equal(p, before[n]) for n, p in bench.loaded.model.named_parameters())
    assert not any("forward" in m.__dict__ for m in bench.loaded.model.modules())  # no replay left behind


def test_a_stop_while_a_sweep_point_scores_ends_the_scoring_within_one_batch(examples, monkeypatch):
    """The stopped sweep used to finish scoring its point (every question) before it noticed."""
    bench = Workbench(tiny_model("opt"))
    stop = StopButton()
    monkeypatch.setattr(ecoflap.shapes.evaluate, "ask", stop.around(ecoflap.shapes.evaluate.ask))
    with pytest.raises(Cancelled):
        measure_point(bench, "magnitude", 0.5, PruneOptions(), eval_n=130, should_stop=stop)  # 3 batches of 64
    assert stop.steps == 1


def test_without_a_stop_every_step_runs(examples, monkeypatch):
    """The counting itself: an unstopped SparseGPT prune runs its pruner once per layer."""
    bench = Workbench(tiny_model("opt"))
    calls = []
    prune_sparsegpt = ecoflap.pipeline.prune_sparsegpt
    monkeypatch.setattr(ecoflap.pipeline, "prune_sparsegpt", lambda *a, **k: calls.append(1) or prune_sparsegpt(*a, **k))
    result, _, _ = bench.prune("sparsegpt", 0.5, OPTS, examples, should_stop=lambda: False)
    assert len(calls) == len(result.layers) > 1


def test_stop_if_asked_and_prefixed():
    stop_if_asked(None)
    stop_if_asked(lambda: False)
    with pytest.raises(Cancelled, match="the session ended"):
        stop_if_asked(lambda: True, "the session ended")
    seen = []
    prefixed(lambda what, done, total: seen.append((what, done, total)), "stage 2: ")("block 3", 3, 7)
    assert seen == [("stage 2: block 3", 3, 7)] and prefixed(None, "x") is None
