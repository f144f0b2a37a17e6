"""The app through its API (gradio_client), launched on 127.0.0.1 with the embedded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gradio_client import handle_file

from conftest import EXAMPLE, FAST, client, prune


def test_describe_names_the_embedded_model(app):
    text = client(app).predict(api_name="/describe")
    assert "shapes-blip2" in text and "prunable" in text and "cpu" in text


@pytest.mark.parametrize("method", ["Magnitude", "Wanda", "SparseGPT", "ECoFLaP (zeroth-order)",
                                    "ECoFLaP (zeroth-order, one perturbation per group)",
                                    "ECoFLaP (first-order)", "ECoFLaP + SparseGPT"])
def test_prune_each_method(app, method):
    c = client(app)
    status, _plot, groups, _sel, _export, run_id, report = prune(c, method, 0.5)
    assert "achieved sparsity" in status and run_id.startswith("run")
    assert report["target_sparsity"] == 0.5
    assert abs(report["achieved_sparsity"] - 0.5) < 0.01
    assert (groups is not None) == method.startswith("ECoFLaP")


def test_ask_full_and_pruned_side_by_side_then_restore_and_export(app, tmp_path):
    c = client(app)
    html_before, before = c.predict(handle_file(str(EXAMPLE)), "how many shapes are there?", api_name="/ask")
    assert before["runs"] == [] and before["full"]
    *_, run_id, report = prune(c, "Wanda", 0.7)
    html_after, after = c.predict(handle_file(str(EXAMPLE)), "how many shapes are there?", api_name="/ask")
    assert after["full"] == before["full"]
    assert [r["run"] for r in after["runs"]] == [run_id]
    assert "Wanda @ 0.70" in html_after and "Full model" in html_after
    caption = c.predict(handle_file(str(EXAMPLE)), "", api_name="/ask")[1]
    assert caption["question"] == "" and caption["full"].startswith("a ")
    assert "bit-identical" in c.predict(api_name="/restore")
    files = c.predict(run_id, False, api_name="/export")
    names = {Path(f).name: f for f in files}
    assert set(names) == {"report.json", "layers.csv"}
    data = json.loads(Path(names["report.json"]).read_text())
    assert data["method"] == "wanda" and data["target_sparsity"] == 0.7
    assert Path(names["layers.csv"]).read_text().splitlines()[0].startswith("name,modality")
    model_files = c.predict(run_id, True, api_name="/export")
    assert any(f.endswith(".zip") for f in model_files)


def test_teach_compares_wanda_and_ecoflap(app):
    c = client(app)
    _plot, text, *_ = c.predict(0.6, handle_file(str(EXAMPLE)), "what shape is the blue object?", api_name="/compare")
    assert "Full model" in text and "Wanda @ 0.60" in text and "ECoFLaP (zeroth-order) @ 0.60" in text
    assert "accuracy" in text


def test_sessions_are_isolated(app):
    a, b = client(app), client(app)
    *_, run_a, _ = prune(a, "Magnitude", 0.9)
    *_, run_b, _ = prune(b, "Wanda", 0.3)
    answers_a = a.predict(handle_file(str(EXAMPLE)), "", api_name="/ask")[1]
    answers_b = b.predict(handle_file(str(EXAMPLE)), "", api_name="/ask")[1]
    assert [r["run"] for r in answers_a["runs"]] == [run_a]
    assert [r["run"] for r in answers_b["runs"]] == [run_b]
    assert answers_a["full"] == answers_b["full"]


@pytest.mark.parametrize(
    "args,message",
    [
        (("Wanda", 0.95), "maximum value 0.9"),
        (("Wanda", -0.1), "minimum value 0"),
        (("ECoFLaP (zeroth-order)", 0.5, {"max_sparsity": 0.3}), "below the target"),
        (("Wanda", 0.5, {"samples": 0}), "at least 1"),
        (("Wanda", 0.5, {"samples": 100000}), "only 128"),
        (("Wanda", 0.5, {"nm": "4:2"}), "N:M"),
        (("ECoFLaP (zeroth-order)", 0.5, {"eps": 0}), "eps"),
    ],
)
def test_bad_prune_settings_give_a_clear_message(app, args, message):
    c = client(app)
    extra = args[2] if len(args) > 2 else {}
    with pytest.raises(Exception) as info:
        c.predict(args[0], args[1], api_name="/prune", **{**FAST, **extra})
    assert message in str(info.value)
    assert "bit-identical" in c.predict(api_name="/restore")


def test_bad_uploads_give_a_clear_message(app, tmp_path):
    c = client(app)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(Exception, match="not an image"):
        c.predict(handle_file(str(text)), "", api_name="/ask")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(EXAMPLE.read_bytes()[:300])
    with pytest.raises(Exception, match="truncated or corrupt|not an image"):
        c.predict(handle_file(str(truncated)), "", api_name="/ask")
    long_question = "what color is the circle? " * 500
    html, answers = c.predict(handle_file(str(EXAMPLE)), long_question, api_name="/ask")
    assert "only the first" in html and len(answers["question"]) <= 500
