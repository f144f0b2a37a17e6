"""Quality against the full model: every figure checked against a computation of its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAST, random_examples, tiny_model

from ecoflap.answers import ask
from ecoflap.data import Example, encode_examples
from ecoflap.options import PruneOptions
from ecoflap.pipeline import prune
from ecoflap.quality import against_full, full_reference, labelled_counts
from ecoflap.scoring import fingerprint, held_out_examples
from ecoflap.precision import ranks
from ecoflap.toy.label_free import spearman
from ecoflap.workbench import Workbench


def _held_out() -> list[Example]:
    examples = random_examples(7, seed=11)
    examples[0].answer = examples[3].answer = ""  # no reference: forced on the full model's own answer
    return examples


def _answer_distributions(loaded, example: Example) -> np.ndarray:
    """Next-token probabilities at the answer tokens of one example, found by position
    arithmetic on an unpadded sequence and checked against the model's own loss."""
    batch = encode_examples(loaded, [example])
    with torch.no_grad():
        out = loaded.model(**batch, use_cache=False)
    logits, labels = out.logits[0].double(), batch["labels"][0]
    if loaded.decoder_only:
        first = batch["input_ids"].shape[1] - labels.shape[0]  # positions before the text (none here)
        where = [first + t - 1 for t in range(labels.shape[0]) if labels[t] != -100]
    else:
        where = [t for t in range(labels.shape[0]) if labels[t] != -100]
    targets = labels[labels != -100]
    log_p = torch.log_softmax(logits[where], -1)
    assert -log_p[torch.arange(len(targets)), targets].mean().item() == pytest.approx(out.loss.item(), rel=1e-5)
    return log_p.exp().numpy()


def test_kl_percentiles_and_same_top_equal_an_independent_computation(family):
    full, pruned = tiny_model(family), tiny_model(family)
    held_out = _held_out()
    result = prune(pruned, "wanda", 0.6, PruneOptions(**{"samples": FAST["samples"]}), random_examples(32),
                   held_out=held_out)
    q = result.quality
    full_answers = ask(full, [e.image for e in held_out], [e.question for e in held_out])
    forced = [Example(e.image, e.question, e.answer or a) for e, a in zip(held_out, full_answers)]
    kl, same_top = [], []
    for example in forced:
        p, r = _answer_distributions(full, example), _answer_distributions(pruned, example)
        kl += list((p * (np.log(p) - np.log(r))).sum(-1))
        same_top += list(p.argmax(-1) == r.argmax(-1))
    kl = np.array(kl)
    assert q["tokens"] == len(kl) > len(held_out)
    assert q["kl_mean"] == pytest.approx(kl.mean(), rel=1e-4, abs=1e-7)
    assert q["kl_median"] == pytest.approx(np.percentile(kl, 50), rel=1e-4, abs=1e-7)
    assert q["kl_p99"] == pytest.approx(np.percentile(kl, 99), rel=1e-4, abs=1e-7)
    assert q["kl_p999"] == pytest.approx(np.percentile(kl, 99.9), rel=1e-4, abs=1e-7)
    assert q["same_top"] == pytest.approx(np.mean(same_top))
    assert kl.mean() > 0 and 0 < np.mean(same_top) < 1  # the pruning changed something, not everything
    pruned_answers = ask(pruned, [e.image for e in held_out], [e.question for e in held_out])
    assert q["same_answer"] == pytest.approx(np.mean([a == b for a, b in zip(full_answers, pruned_answers)]))
    assert q["teacher_forced_on"].startswith("5 reference answers, 2 of the full model's")
    assert q["flips"]["right_to_wrong"] + q["flips"]["wrong_to_right"] == sum(
        (a == e.answer) != (b == e.answer) for a, b, e in zip(full_answers, pruned_answers, held_out) if e.answer)


def test_the_full_model_against_itself_is_identical():
    loaded = tiny_model("opt")
    q = against_full(loaded, full_reference(loaded, _held_out()), labelled=True)
    assert q["kl_mean"] == q["kl_p999"] == 0 and q["same_top"] == q["same_answer"] == 1
    assert q["flips"] == {"right_to_wrong": 0, "wrong_to_right": 0} and q["accuracy"] == q["full_accuracy"]


def test_flips_equal_a_count_over_the_answers():
    full, pruned = tiny_model("opt"), tiny_model("opt")
    prune(pruned, "magnitude", 0.7)
    examples = random_examples(16, seed=5)
    images, questions = [e.image for e in examples], [e.question for e in examples]
    full_answers, pruned_answers = ask(full, images, questions), ask(pruned, images, questions)
    # half the references are the full model's answers, half the pruned model's: both kinds of flip occur
    for i, e in enumerate(examples):
        e.answer = full_answers[i] if i % 2 == 0 else pruned_answers[i]
    q = against_full(pruned, full_reference(full, examples), labelled=True)
    scored = [i for i, e in enumerate(examples) if e.answer]  # an empty answer is no reference
    full_right = {i: full_answers[i] == examples[i].answer for i in scored}
    right = {i: pruned_answers[i] == examples[i].answer for i in scored}
    r2w = sum(full_right[i] and not right[i] for i in scored)
    w2r = sum(right[i] and not full_right[i] for i in scored)
    assert r2w > 0 and w2r > 0
    assert q["flips"] == {"right_to_wrong": r2w, "wrong_to_right": w2r}
    assert q["full_accuracy"] == pytest.approx(sum(full_right.values()) / len(scored))
    assert q["accuracy"] == pytest.approx(sum(right.values()) / len(scored))


def test_labelled_counts_by_hand():
    counts = labelled_counts(["red", "two", "yes", "no"], ["Red.", "three", "no", "no"], ["red", "two", "no", "no"])
    assert counts == {"accuracy": 0.75, "full_accuracy": 0.75, "flips": {"right_to_wrong": 1, "wrong_to_right": 1}}


def test_held_out_examples_never_show_a_calibration_image():
    generated = held_out_examples([], n=20, seed=3)
    assert len(generated) == 20
    calibration = random_examples(8) + generated[:5]
    held = held_out_examples(calibration, n=20, seed=3)
    used = {fingerprint(e.image) for e in calibration}
    assert len(held) == 15 and not used & {fingerprint(e.image) for e in held}
    assert [e.question for e in held] == [e.question for e in generated[5:]]
    # the shipped set (the default calibration) and the sweep's questions do not overlap
    from ecoflap.data import default_calibration
    shipped = {fingerprint(e.image) for e in default_calibration()}
    assert len(held_out_examples(n=200)) == 200 and not shipped & {fingerprint(e.image) for e in held_out_examples(n=200)}


def test_held_out_from_a_pool_leaves_out_what_calibration_used():
    pool = random_examples(12, seed=2)
    calibration = pool[:8]
    held = held_out_examples(calibration, n=3, seed=1, pool=pool)
    assert len(held) == 3 and all(any(e is p for p in pool[8:]) for e in held)
    assert held == held_out_examples(calibration, n=3, seed=1, pool=pool)  # fixed seed, same draw
    with pytest.raises(ValueError, match="none is left to hold out"):
        held_out_examples(pool, pool=pool)


def test_workbench_measures_the_full_model_once_and_restores_it():
    bench = Workbench(tiny_model("opt"))
    held_out = _held_out()
    first, _, _ = bench.prune("wanda", 0.5, PruneOptions(samples=8), random_examples(8), held_out=held_out)
    assert bench.reference(held_out) is bench.reference(held_out)
    again, _, _ = bench.prune("wanda", 0.5, PruneOptions(samples=8), random_examples(8), held_out=held_out)
    assert first.quality == again.quality and first.quality["kl_mean"] > 0
    assert bench.store.is_original()
    assert first.to_dict()["quality"] == first.quality


def test_spearman_by_hand():
    assert list(ranks([3, 1, 2, 2])) == [4, 1, 2.5, 2.5]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    # ranks x = 1, 2.5, 2.5, 4 and y = 1, 3, 2, 4: covariance 4.5, variances 4.5 and 5
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / np.sqrt(4.5 * 5))
    assert spearman([1, 1, 1], [1, 2, 3]) is None


@pytest.mark.usefixtures("few_quality_questions")
def test_a_model_that_is_not_the_shapes_model_is_compared_by_its_distance_from_the_full_model(tmp_path):
    """The Teach comparison and every run's report for a model exact match cannot score."""
    from tiny_families import tiny

    from conftest import make_server, saved
    from ecoflap.serve.session import QUALITY_N

    me = make_server(saved(tiny("llava"), tmp_path / "llava"), tmp_path, allow_local_models=True).open_session()
    run = me.prune("wanda", 0.5, samples=8)
    assert run.result.quality["n"] == QUALITY_N == 10 and "accuracy" not in run.result.quality
    comparison = me.compare(["magnitude", "wanda"], 0.6, eval_n=10)
    assert comparison.metric == "mean KL from the full model" and not comparison.higher_is_better
    full, *runs = comparison.rows
    assert full["score"] == 0 and full["quality"]["same_top"] == 1
    for row, r in zip(runs, comparison.runs):
        assert row["score"] == r.result.quality["kl_mean"] > 0 and row["quality"]["n"] == 10


def test_the_label_free_measurement_covers_the_cards_table_informative_points_first():
    from pathlib import Path

    from ecoflap.toy.label_free import points

    folder = Path(__file__).resolve().parent.parent / "assets" / "shapes-blip2"
    chosen = points(folder)
    assert len(chosen) == len({(p["method"], p["sparsity"], p["seed"]) for p in chosen}) == 40
    assert {p["sparsity"] for p in chosen[:12]} == {0.7, 0.8}
    assert all(p["vision_sparsity"] is not None for p in chosen if p["method"] == "per_modality")
    rows = points(folder, by="method")
    assert sorted(map(str, rows)) == sorted(map(str, chosen))
    assert [(p["method"], p["sparsity"]) for p in rows[:5]] == [("wanda", s) for s in (0.7, 0.8, 0.6, 0.5, 0.75)]
    assert [p["method"] for p in rows[5:30:5]] == ["global_magnitude", "owl", "ecoflap_first", "ecoflap_zeroth",
                                                   "per_modality"]
    assert [(p["method"], p["seed"]) for p in rows[30:]] == [("ecoflap_zeroth", 1)] * 5 + [("ecoflap_zeroth", 2)] * 5


def test_label_free_table_and_correlations():
    from ecoflap.toy.label_free import correlations, correlations_by_sparsity, table

    def row(method, accuracy, kl, same):
        return {"method": method, "sparsity": 0.7, "seed": 0, "quality": {
            "accuracy": accuracy, "kl_mean": kl, "kl_median": 0.001, "kl_p99": 10 * kl, "same_top": same,
            "same_answer": accuracy, "flips": {"right_to_wrong": 3, "wrong_to_right": 1}}}

    rows = [row("wanda", 0.7, 0.5, 0.8), row("owl", 0.6, 0.7, 0.85), row("global_magnitude", 0.9, 0.1, 0.95)]
    rho = correlations(rows)
    assert rho["kl_mean"] == pytest.approx(-1) and rho["same_top"] == pytest.approx(0.5)
    assert rho["kl_median"] is None  # constant: no ranking
    text = table({"rows": rows, "spearman_with_accuracy": rho})
    assert "| wanda | 0.7 | 0 | 70.0% | 3 / 1 | 0.5000 |" in text
    assert "mean KL -1.000" in text and "median KL undefined (constant)" in text
    assert text.splitlines()[-1] == "| 0.7 | 3 | -1.000 | constant | -1.000 | +0.500 | +1.000 |"
    # at 0.8, accuracy 0.3, 0.4, 0.2 ranks (2, 3, 1); KL 0.9, 0.8, 0.7 ranks (3, 2, 1): d = (1, 1, 0), 1 - 6 * 2 / 24
    rows += [{**row(m, a, kl, 0.5), "sparsity": 0.8} for m, a, kl in [("wanda", 0.3, 0.9), ("owl", 0.4, 0.8),
                                                                      ("global_magnitude", 0.2, 0.7)]]
    within = correlations_by_sparsity(rows)
    assert list(within) == ["0.7", "0.8"] and within["0.8"]["rows"] == 3
    assert within["0.8"]["kl_mean"] == pytest.approx(0.5) and within["0.7"]["kl_mean"] == pytest.approx(-1)
    assert within["0.8"]["same_top"] is None


def test_sweep_rows_carry_each_runs_quality_measured_on_its_own(monkeypatch):
    """Every sweep point's quality columns equal a computation of their own (the same run
    repeated on a fresh copy, its distributions and answers compared here), and the full
    model's side is measured once per sweep, not once per point."""
    import ecoflap.workbench
    from ecoflap.sweep import quality_columns, sweep

    held_out, calibration, options = _held_out(), random_examples(8), PruneOptions(samples=8)
    measured = []
    reference_for = ecoflap.workbench.reference_for
    monkeypatch.setattr(ecoflap.workbench, "reference_for",
                        lambda loaded, examples: measured.append(1) or reference_for(loaded, examples))
    rows = sweep(Workbench(tiny_model("opt")), ["magnitude", "wanda"], [0.6], options, calibration, eval_n=10,
                 held_out=held_out)
    assert len(measured) == 1 and [r["method"] for r in rows] == ["magnitude", "wanda"]
    full = tiny_model("opt")
    full_answers = ask(full, [e.image for e in held_out], [e.question for e in held_out])
    forced = [Example(e.image, e.question, e.answer or a) for e, a in zip(held_out, full_answers)]
    full_p = [_answer_distributions(full, e) for e in forced]
    for row in rows:
        pruned = tiny_model("opt")
        prune(pruned, row["method"], 0.6, options, calibration)
        kl, same_top = [], []
        for p, example in zip(full_p, forced):
            r = _answer_distributions(pruned, example)
            kl += list((p * (np.log(p) - np.log(r))).sum(-1))
            same_top += list(p.argmax(-1) == r.argmax(-1))
        answers = ask(pruned, [e.image for e in held_out], [e.question for e in held_out])
        assert row["kl_mean"] == pytest.approx(np.mean(kl), rel=1e-4, abs=1e-7) and row["kl_mean"] > 0
        assert row["kl_p99"] == pytest.approx(np.percentile(kl, 99), rel=1e-4, abs=1e-7)
        assert row["kl_median"] == pytest.approx(np.percentile(kl, 50), rel=1e-4, abs=1e-7)
        assert row["same_top"] == pytest.approx(np.mean(same_top))
        assert row["same_answer"] == pytest.approx(np.mean([a == b for a, b in zip(full_answers, answers)]))
        scored = [i for i, e in enumerate(held_out) if e.answer]
        full_right = [full_answers[i] == held_out[i].answer for i in scored]
        right = [answers[i] == held_out[i].answer for i in scored]
        assert row["accuracy"] == pytest.approx(np.mean(right)) and row["full_accuracy"] == pytest.approx(
            np.mean(full_right))
        assert (row["right_to_wrong"], row["wrong_to_right"]) == (
            sum(f and not r for f, r in zip(full_right, right)), sum(r and not f for f, r in zip(full_right, right)))
        # and the same figures the run's own report carries
        again = prune(tiny_model("opt"), row["method"], 0.6, options, calibration, held_out=held_out).quality
        assert {k: row[k] for k in quality_columns(again)} == pytest.approx(quality_columns(again))
