"""The app through its API (gradio_client), launched on 127.0.0.1 with the embedded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gradio_client import handle_file

import ecoflap
from ecoflap.serve.soak import prune_values, raw_call
from conftest import EXAMPLE, FAST, client, prune

METHODS = list(ecoflap.METHODS)


def test_describe_names_the_embedded_model_not_its_path(app):
    text = client(app).predict(api_name="/describe")
    assert "`shapes-blip2`" in text and "prunable" in text and "cpu" in text
    assert "/assets/" not in text and str(Path(__file__).resolve().parent.parent) not in text


@pytest.mark.parametrize("method", METHODS)
def test_prune_each_method(app, method):
    c = client(app)
    status, _plot, groups, _overlay, _export, _dist, run_id, report = prune(c, method, 0.5)
    assert "achieved sparsity" in status and run_id.startswith("run-")
    assert "Against the full model" in status and "same top" in status and report["quality"]["n"] == 100
    assert report["target_sparsity"] == 0.5 and report["method"] == method and report["model"] == "shapes-blip2"
    assert abs(report["achieved_sparsity"] - 0.5) < 0.01
    assert groups["visible"] == bool(report["groups"])  # allocations with groups draw them, scored or not
    assert bool(report["groups"]) == (ecoflap.METHODS[method].allocation != "uniform")
    if groups["visible"]:
        assert json.loads(groups["value"]["plot"])["data"]


def test_ask_full_and_pruned_side_by_side_then_verify_and_export(app, tmp_path):
    c = client(app)
    _html, before = c.predict(handle_file(str(EXAMPLE)), "how many shapes are there?", api_name="/ask")
    assert before["runs"] == [] and before["full"]
    *_, run_id, report = prune(c, "wanda", 0.7)
    html_after, after = c.predict(handle_file(str(EXAMPLE)), "how many shapes are there?", api_name="/ask")
    assert after["full"] == before["full"]
    assert [r["run"] for r in after["runs"]] == [run_id]
    assert "Wanda @ 0.70" in html_after and "Full model" in html_after
    caption = c.predict(handle_file(str(EXAMPLE)), "", api_name="/ask")[1]
    assert caption["question"] == "" and caption["full"].startswith("a ")
    assert "bit-identical" in c.predict(api_name="/restore")
    files = c.predict(run_id, False, api_name="/export")
    names = {Path(f).name: f for f in files}
    assert set(names) == {"wanda-0.70.report.json", "wanda-0.70.layers.csv"}
    data = json.loads(Path(names["wanda-0.70.report.json"]).read_text())
    assert data["method"] == "wanda" and data["target_sparsity"] == 0.7 and data["model"] == "shapes-blip2"
    assert Path(names["wanda-0.70.layers.csv"]).read_text().splitlines()[0].startswith("name,modality")
    model_files = c.predict(run_id, True, api_name="/export")
    assert any(f.endswith("wanda-0.70.model.zip") for f in model_files)


def test_compare_three_methods(app):
    c = client(app)
    outputs = c.predict(["wanda", "ecoflap_zeroth", "magnitude"], 0.6, handle_file(str(EXAMPLE)),
                        "what shape is the blue object?", api_name="/compare")
    text, _plot, overlay, *_ = outputs
    for label in ("Full model", "Wanda @ 0.60", "ECoFLaP (zeroth-order) @ 0.60", "Magnitude @ 0.60"):
        assert label in text
    assert "accuracy" in text and "200 generated shapes questions (seed 1234" in text
    assert "same top" in text and "flips r→w / w→r" in text and "went right→wrong / wrong→right" in text
    assert len(overlay["value"]) == 3 and len(overlay["choices"]) == 3
    assert "Takeaway:" in text and "comes closest to the full model" in text and "?." not in text
    files = {Path(f).name: Path(f) for f in outputs[-2]}
    assert outputs[-1].startswith("Compared 3 methods at 0.60")
    table = json.loads(files["comparison.json"].read_text())["rows"]
    assert [r["label"] for r in table] == ["Full model", "Wanda @ 0.60", "ECoFLaP (zeroth-order) @ 0.60",
                                           "Magnitude @ 0.60"]
    for row in table:  # the CSV and the page show the same scores
        assert f"| {row['label']} | {row['score']:.3f} |" in text
    assert files["comparison.csv"].read_text().splitlines()[0] == \
        "label,metric,score,vision_sparsity,language_sparsity,answer"
    # a question without an image is not dropped silently
    text = c.predict(["wanda", "magnitude"], 0.6, None, "what shape is it?", api_name="/compare")[0]
    assert "Your question was not asked: it needs an image" in text


def test_sessions_are_isolated(app):
    a, b = client(app), client(app)
    *_, run_a, _ = prune(a, "magnitude", 0.9)
    *_, run_b, _ = prune(b, "wanda", 0.3)
    answers_a = a.predict(handle_file(str(EXAMPLE)), "", api_name="/ask")[1]
    answers_b = b.predict(handle_file(str(EXAMPLE)), "", api_name="/ask")[1]
    assert [r["run"] for r in answers_a["runs"]] == [run_a]
    assert [r["run"] for r in answers_b["runs"]] == [run_b]
    assert answers_a["full"] == answers_b["full"]
    for endpoint, args in [("/export", (run_a, True)), ("/distributions", (run_a, None))]:
        with pytest.raises(Exception, match="(?i)no run with that id in this session"):
            b.predict(*args, api_name=endpoint)


def test_distributions_take_a_run_id_from_the_api(app):
    c = client(app)
    *_, run_id, _ = prune(c, "magnitude", 0.6)
    weights, grads, reading = c.predict(run_id, None, api_name="/distributions")
    names = [t["name"] for t in json.loads(weights["plot"])["data"]]
    assert any("Magnitude @ 0.60" in n and "(60% zeros)" in n for n in names)
    assert any("full" in n for n in names)
    assert reading.startswith("**Reading:** In this model the") and "x):" in reading
    # two runs against the full model, one legend order in both plots, powers of ten on the axis
    *_, other, _ = prune(c, "wanda", 0.6)
    weights, grads, _ = c.predict(run_id, other, api_name="/distributions")
    for figure in (json.loads(weights["plot"]), json.loads(grads["plot"])):
        assert figure["layout"]["xaxis"]["exponentformat"] == "power"
        series = [n.split(" · ")[1].split(" (")[0] for n in (t["name"] for t in figure["data"])]
        assert list(dict.fromkeys(series)) == ["full", "Magnitude @ 0.60", "Wanda @ 0.60"]
    order = [[t["name"].split(" · ")[0] for t in json.loads(f["plot"])["data"]] for f in (weights, grads)]
    assert order[0] == order[1]


@pytest.mark.parametrize(
    "args,message",
    [
        (("wanda", 0.99), "from 0 to 0.95"),
        (("wanda", -0.1), "from 0 to 0.95"),
        (("wanda", "abc"), "sparsity must be a number"),
        (("wanda", None), "sparsity must be a number"),
        (("Wanda", 0.5), "unknown method"),
        (("ecoflap_zeroth", 0.5, {"max_sparsity": 0.3}), "below the target"),
        (("wanda", 0.5, {"samples": 0}), "from 1 to"),
        (("wanda", 0.5, {"samples": 100000}), "from 1 to"),
        (("wanda", 0.5, {"samples": 1000}), "only 128"),
        (("wanda", 0.5, {"nm": "4:2"}), "N:M"),
        (("wanda", 0.3, {"nm": "2:4"}), "set the sparsity to 0.50"),
        (("ecoflap_zeroth", 0.5, {"eps": 0}), "eps"),
        (("ecoflap_zeroth", 0.5, {"eps": 1e300}), "eps"),
        (("ecoflap_zeroth", 0.5, {"modules": []}), "at least one module set"),
    ],
)
def test_bad_prune_settings_give_a_clear_message(app, args, message):
    c = client(app)
    extra = args[2] if len(args) > 2 else {}
    with pytest.raises(Exception) as info:
        c.predict(args[0], args[1], api_name="/prune", **{**FAST, **extra})
    assert message.lower() in str(info.value).lower()
    assert "bit-identical" in c.predict(api_name="/restore")


def test_bad_uploads_and_questions_give_a_clear_message(app, tmp_path):
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
    with pytest.raises(Exception, match="(?i)upload an image"):
        c.predict(None, "what?", api_name="/ask")


def test_sweep_uses_method_labels_and_checks_its_list(app):
    c = client(app)
    plot, table, status, files, axis = c.predict(["wanda"], "0.3,0.6", api_name="/sweep")
    assert [row[0] for row in table["data"]] == ["Wanda", "Wanda"] and "2 points" in status
    # the table names its measure as the chart does, the figures against the full model beside it, and the
    # prune's and the scoring's seconds apart
    assert table["headers"] == ["method", "sparsity", "accuracy", "KL mean", "KL p99", "same top-1", "same answer",
                                "right→wrong", "wrong→right", "achieved", "prune s", "point s"]
    figure = json.loads(plot["plot"])
    assert figure["layout"]["yaxis"]["title"]["text"] == "accuracy" and axis["value"] == "accuracy"
    assert [y for _, y in axis["choices"]] == ["accuracy", "kl_mean", "kl_median", "kl_p99", "kl_p999", "same_top",
                                              "same_answer", "right_to_wrong", "wrong_to_right"]  # what it measured
    full = [s for s in figure["layout"]["shapes"] if s["type"] == "line"]
    assert len(full) == 1 and f"full model (accuracy {full[0]['y0']:.4f}; against itself: KL 0" in status
    named = {Path(f).name: Path(f) for f in files}
    assert set(named) == {"sweep.csv", "sweep.json"}
    saved = json.loads(named["sweep.json"].read_text())["rows"]
    csv_rows = named["sweep.csv"].read_text().splitlines()
    assert len(saved) == 2 and len(csv_rows) == 3 and csv_rows[0].startswith("method,sparsity,metric,score")
    assert {"kl_mean", "kl_p99", "same_top", "same_answer", "accuracy", "right_to_wrong"} <= set(csv_rows[0].split(","))
    assert full[0]["y0"] == saved[0]["full_accuracy"]  # the full model's accuracy on the same questions
    for row, shown in zip(saved, table["data"]):
        assert [row["label"], row["sparsity"], round(row["score"], 4), round(row["kl_mean"], 4),
                round(row["same_top"], 4), round(row["seconds"], 2), round(row["wall_seconds"], 2)] == \
            [shown[0], shown[1], shown[2], shown[3], shown[5], shown[10], shown[11]]
        assert row["wall_seconds"] > row["seconds"]  # the point's wall time includes its scoring
    for bad, message in [("0.5,,0.6", "empty"), ("-0", "plain decimal"), ("1e-400", "plain decimal"),
                         ("0.5,0.5", "only once")]:
        with pytest.raises(Exception, match=message):
            c.predict(["wanda"], bad, api_name="/sweep")


def test_public_deployment_refuses_server_folders(app):
    c = client(app)
    for name in ("/etc", "/root", "../assets"):
        with pytest.raises(Exception, match="from the Hugging Face hub by id") as refused:
            c.predict(name, api_name="/load_model")
        assert "No such" not in str(refused.value) and "Errno" not in str(refused.value)
    # a folder whose path looks like a hub id answers like a hub id that does not exist
    with pytest.raises(Exception, match="Cannot load 'assets/shapes-blip2' from the Hugging Face hub: no such model"):
        c.predict("assets/shapes-blip2", api_name="/load_model")
    with pytest.raises(Exception, match="at most 200 characters"):
        c.predict("x" * 5000, api_name="/load_model")


def test_handlers_live_at_module_level_and_build_app_is_layout():
    """app.py reads top to bottom: handlers, then the page that binds them (no inner closures)."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parent.parent / "app.py").read_text())
    build = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build_app")
    inner = [n.name for n in ast.walk(build) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
             and n is not build]
    assert inner == []


def test_calibration_sources_through_the_api(app, tmp_path):
    """Own images labelled by the full model; a hub id the deployment does not allow and a server
    path are refused with one line, and the model keeps its full weights."""
    c = client(app)
    status, plot, *_rest, report = prune(c, "wanda", 0.5, calibration_images=[handle_file(str(EXAMPLE))] * 2,
                                         calibration_question="how many shapes are there?")
    assert report["calibration"]["kind"] == "images" and report["calibration"]["count"] == 2
    assert "Calibrated on 2 samples of 2 uploaded image(s)" in status and "full model's own answers" in status
    title = json.loads(plot["plot"])["layout"]["title"]["text"].replace("</sup><br><sup>", " ")  # wrapped notes
    assert "⚠ The calibration targets are the full model's own answers" in title
    for extra, message in [({"calibration": "hf:someone/data"}, "takes no calibration data from the hub"),
                           ({"calibration": "/etc"}, "never from a path on the server")]:
        with pytest.raises(Exception) as info:
            prune(c, "wanda", 0.5, **extra)
        assert message in str(info.value)
    file_data = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}
    for paths in ([file_data], [{"path": "/etc/passwd"}], ["/etc/passwd"]):  # raw HTTP, as a stranger sends it
        kind, result = raw_call(app, "prune", prune_values(method="wanda", samples=8, stage1_samples=8,
                                                           calibration_images=paths))
        assert kind == "error" and "/etc" not in json.dumps(result)  # gradio or the upload check refuses
    assert "bit-identical" in c.predict(api_name="/restore")


def test_a_picture_the_shapes_model_cannot_understand_is_told_beside_its_answers(app, tmp_path):
    import numpy as np
    from PIL import Image

    c = client(app)
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8")).save(photo)
    page, _ = c.predict(handle_file(str(photo)), "what is this?", api_name="/ask")
    assert "not one of the shapes pictures" in page
    assert page.index("not one of the shapes pictures") > page.index("Full model")  # beside the answers
    example, _ = c.predict(handle_file(str(EXAMPLE)), "what is this?", api_name="/ask")
    assert "not one of the shapes pictures" not in example
    # Teach's comparison answers the same photo: the note sits right under the answers' table
    text = c.predict(["magnitude", "global_magnitude"], 0.5, handle_file(str(photo)), "what is this?",
                     api_name="/compare")[0]
    table_end = text.index("| Global magnitude @ 0.50 |")
    note = text.index("not one of the shapes pictures")
    assert table_end < note < text.index("Accuracy: exact match")
    shipped = c.predict(["magnitude", "global_magnitude"], 0.5, handle_file(str(EXAMPLE)), "what is this?",
                        api_name="/compare")[0]
    assert "| Global magnitude @ 0.50" in shipped and "not one of the shapes pictures" not in shipped


def test_the_prune_api_takes_what_it_took_before_the_tab_asked_two_questions(app):
    """The tab now asks for an allocation and a stage 2 and shows every default's value; /prune
    still takes one method name (its alias too) and 0 or "" for "the default", over raw HTTP."""
    def call(method, cap, stage1, vision):
        kind, out = raw_call(app, "prune", prune_values(method=method, max_sparsity=cap, samples=16,
                                                        stage1_samples=stage1, vision_sparsity=vision))
        assert kind == "complete", out
        return out[7]

    before = call("ecoflap", 0, 0, "")  # as a client sent it before
    assert before["method"] == "ecoflap_zeroth"
    assert before["options"]["max_sparsity"] == 0.6 and before["options"]["stage1_samples"] == 32
    shown = call("ecoflap_zeroth", 0.6, 32, "")  # what the tab sends now: the values it shows
    assert [r["zeros"] for r in shown["layers"]] == [r["zeros"] for r in before["layers"]]
    split = call("per_modality", 0, 0, "")
    assert split["options"]["vision_sparsity"] == 0.5
    typed = call("per_modality", 0.6, 32, "0.50")
    assert [r["zeros"] for r in typed["layers"]] == [r["zeros"] for r in split["layers"]]
