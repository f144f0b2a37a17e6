"""The Recover tab over raw HTTP: a run recovered into a new run, its report, and calm refusals."""

from __future__ import annotations

import re

import pytest

from conftest import client, prune
from ecoflap.models import load_model
from ecoflap.scoring import quick_score


def test_recover_makes_a_new_run_with_the_zeros_held(app):
    c = client(app)
    *_, run_id, report = prune(c, "wanda", 0.7)
    text, _loss, answers, overlay, export_run, dist_run, chosen = c.predict(
        run_id, 20, "full", 2e-5, 0.05, "cosine", 8, 50, api_name="/recover")
    assert "**Wanda @ 0.70 + 20 steps** done" in text and "identical in every layer" in text
    assert "Accuracy (higher is better)" in text and "50 generated shapes questions" in text
    labels = [label for label, _ in chosen["choices"]]
    assert labels == ["Wanda @ 0.70", "Wanda @ 0.70 + 20 steps"]
    assert export_run["value"] == dist_run["value"] == chosen["value"] != run_id
    assert "Full model" in answers and "Wanda @ 0.70 + 20 steps" in answers
    # the score row: the full model, the run and its recovery on the same 50 questions
    score_row = re.search(r"<tr><td[^>]*><b>accuracy</b> on 50 questions</td>(.*?)</tr>", answers).group(1)
    full, before, after = re.findall(r"<td[^>]*>([^<]*)</td>", score_row)
    reference = quick_score(load_model(device="cpu", dtype="float32"), 50)["value"]  # computed here, apart
    assert full == f"{reference:.3f}"
    assert f"**{before} → {after}**" in text
    latest = c.predict(None, 3, "lora", 2e-5, 0.05, "cosine", 4, 0, api_name="/recover")[0]
    assert "**Wanda @ 0.70 + 20 steps + 3 steps (LoRA)** done" in latest and "0 new nonzeros" in latest
    assert "bit-identical" in c.predict(api_name="/restore")


@pytest.mark.parametrize("run,steps,lr,message", [
    ("none", 10, 2e-5, "prune first, then pick one of your runs"),
    ("run-guessed", 10, 2e-5, "no run with that id in this session"),
    ("mine", 0, 2e-5, "steps must be a whole number from 1 to 300"),
    ("mine", 301, 2e-5, "steps must be a whole number from 1 to 300"),
    ("mine", 10, -0.1, "the learning rate must be positive"),
])
def test_bad_recover_settings_get_one_clear_message(app, run, steps, lr, message):
    c = client(app)
    if run == "mine":
        run = prune(c, "magnitude", 0.5)[-2]
    elif run == "none":  # nothing picked and no run yet (with a run, the latest is recovered)
        run = None
    with pytest.raises(Exception) as refused:
        c.predict(run, steps, "full", lr, 0.05, "cosine", 8, 0, api_name="/recover")
    assert message.lower() in str(refused.value).lower() and "Traceback" not in str(refused.value)
