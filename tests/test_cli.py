"""The command line, end to end on tiny models saved to local folders."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecoflap.__main__ import main
from ecoflap.models import ModelLoadError, load_model

ROOT = Path(__file__).resolve().parent.parent


def run(*args, separate_process: bool = False):
    """The command's exit code and output: in this process (fast: no second start of torch
    and transformers), or as `python -m ecoflap` in its own process."""
    if separate_process:
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
        return subprocess.run([sys.executable, "-m", "ecoflap", *args], capture_output=True, text=True, env=env,
                              cwd=ROOT)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit:  # argparse refusing an option
            code = exit.code
    return subprocess.CompletedProcess(["ecoflap", *args], code or 0, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("method", ["wanda", "ecoflap"])
def test_prune_writes_report_and_model(saved_model, calibration_folder, tmp_path, method):
    report = tmp_path / "report.json"
    out = tmp_path / "pruned"
    done = run("prune", "--model", str(saved_model), "--method", method, "--sparsity", "0.6",
               "--calibration", str(calibration_folder), "--samples", "16", "--stage1-samples", "8",
               "--report", str(report), "--save", str(out))
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    for key in ("model", "method", "options", "target_sparsity", "achieved_sparsity", "layers",
                "groups", "timings", "peak_memory_bytes"):
        assert key in data
    name = {"wanda": "wanda", "ecoflap": "ecoflap_zeroth"}[method]
    assert data["method"] == name and data["target_sparsity"] == 0.6
    assert set(data["layers"][0]) >= {"name", "modality", "block", "numel", "sparsity"}
    assert data["timings"]["total_s"] > 0
    if method == "ecoflap":
        assert data["groups"] and set(data["groups"][0]) >= {"name", "numel", "score", "sparsity"}
        assert data["options"]["max_sparsity"] == pytest.approx(0.7)
    reloaded = load_model(str(out), device="cpu")
    zeros = sum(int((reloaded.model.get_submodule(r["name"]).weight == 0).sum()) for r in data["layers"])
    numel = sum(r["numel"] for r in data["layers"])
    assert zeros / numel == pytest.approx(data["achieved_sparsity"])
    assert json.loads((out / "ecoflap_report.json").read_text())["method"] == name
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))


@pytest.mark.parametrize(
    "args,message",
    [
        pytest.param(["--model", "/nonexistent/model"], "no model folder", marks=pytest.mark.slow),
        (["--method", "nope"], "unknown method"),
        (["--sparsity", "1.2"], "sparsity must be a number from 0 to 0.95"),
        (["--batch-size", "1000"], "batch size must be a whole number from 1 to 64"),  # as the app and the API
        (["--nm", "4:2"], "N:M"),
        (["--method", "ecoflap", "--max-sparsity", "0.3"], "below the target"),
        (["--method", "per_modality", "--vision-sparsity", "1.2"], "vision sparsity"),
        (["--method", "owl", "--owl-lambda", "0.7"], "lambda"),
    ],
)
def test_prune_bad_input_is_one_clear_line(saved_model, args, message):
    model = [] if args[0] == "--model" else ["--model", str(saved_model)]
    done = run("prune", *model, *args, separate_process=args[0] == "--model")  # once as `python -m ecoflap`
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args,message", [
    (["sweep", "--samples", "0"], "calibration samples must be a whole number from 1 to 10000 (got 0)"),
    (["sweep", "--methods", "wanda", "--sparsities", "0.5", "--loss", "x"], "invalid choice"),
    (["bench", "--batch-size", "65"], "batch size must be a whole number from 1 to 64 (got 65)"),
    (["bench", "--sparsity", "0.96"], "sparsity must be a number from 0 to 0.95 (got 0.96)"),
    (["eval", "--method", "wanda", "--sparsity", "1"], "sparsity must be a number from 0 to 0.95 (got 1.0)"),
    (["eval", "--method", "wanda", "--samples", "20000"], "calibration samples must be a whole number"),
])
def test_every_command_refuses_bad_options_at_the_same_edge_before_loading(args, message):
    done = run(*args, "--model", "/nonexistent/model")  # refused before the (missing) model would load
    assert done.returncode == 2
    assert message in done.stderr.strip().splitlines()[-1] and "no model folder" not in done.stderr


def test_prune_owl_hits_the_budget_inside_the_band(saved_model, calibration_folder, tmp_path):
    report = tmp_path / "report.json"
    done = run("prune", "--model", str(saved_model), "--method", "owl", "--sparsity", "0.6",
               "--calibration", str(calibration_folder), "--samples", "16", "--report", str(report))
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    total = sum(r["numel"] for r in data["layers"])
    assert total - sum(r["zeros"] for r in data["layers"]) == math.floor(total * 0.4 + 1e-9)
    assert "achieved 0.6000" in done.stdout
    assert data["options"]["band"] == pytest.approx([0.52, 0.68]) and data["options"]["owl_m"] == 5
    groups = data["groups"]
    assert len({round(g["sparsity"], 4) for g in groups}) > 1
    for g in groups:
        assert 0.52 - 1 / g["numel"] <= g["sparsity"] <= 0.68 + 1 / g["numel"] and g["score"] >= 0


@pytest.mark.slow  # many prunes and scores end to end
def test_sweep_measures_random_methods_once_per_seed(saved_model, calibration_folder, tmp_path):
    out, csv = tmp_path / "sweep.json", tmp_path / "sweep.csv"
    done = run("sweep", "--model", str(saved_model), "--calibration", str(calibration_folder),
               "--methods", "global_magnitude,ecoflap_zeroth", "--sparsities", "0.5", "--seeds", "3,4",
               "--samples", "8", "--eval-n", "10", "--json", str(out), "--csv", str(csv),
               "--html", str(tmp_path / "sweep.html"))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["seed"]) for r in rows] == [("global_magnitude", 3), ("ecoflap_zeroth", 3),
                                                        ("ecoflap_zeroth", 4)]
    for r in rows:
        assert set(r) >= {"method", "label", "sparsity", "seed", "score", "achieved_sparsity", "seconds"}
        assert r["achieved_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert "seed" in csv.read_text().splitlines()[0].split(",")


def test_ask_single_and_jsonl(saved_model, calibration_folder, tmp_path):
    image = calibration_folder / "0.png"
    done = run("ask", "--model", str(saved_model), "--image", str(image), "--question", "what color is the circle?",
               "--max-new-tokens", "3")
    assert done.returncode == 0, done.stderr
    rows = [{"image": str(calibration_folder / f"{i}.png"), "question": q}
            for i, q in enumerate(["", "how many shapes are there?", "is there a red square?"])]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = run("ask", "--model", str(saved_model), "--jsonl", str(jsonl), "--max-new-tokens", "3")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(layer) for layer in done.stdout.strip().splitlines()]
    assert [(layer["image"], layer["question"]) for layer in lines] == [(r["image"], r["question"]) for r in rows]
    assert all(isinstance(layer["answer"], str) for layer in lines)


def test_load_model_errors(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelLoadError, match="not BLIP-2"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_model(str(tmp_path.parent), device="cpu")


def test_t5_refuses_float16(tmp_path):
    from conftest import saved, tiny_model

    saved(tiny_model("t5"), tmp_path)
    with pytest.raises(ModelLoadError, match="float16"):
        load_model(str(tmp_path), device="cpu", dtype="float16")
    assert load_model(str(tmp_path), device="cpu", dtype="bfloat16").model.dtype == torch.bfloat16


def test_eval_reports_accuracy_per_type_on_the_shipped_model(tmp_path):
    out = tmp_path / "eval.json"
    done = run("eval", "--n", "50", "--json", str(out))
    assert done.returncode == 0, done.stderr
    score = json.loads(out.read_text())
    assert set(score["by_type"]) == {"color", "shape", "count", "exists", "caption"}
    assert score["metric"] == "accuracy" and score["n"] == 50 and score["value"] >= 0.9
    assert f"accuracy: {score['value']:.4f} on 50 examples" in done.stdout
    assert sum(score["by_type"].values()) / 5 == pytest.approx(score["value"], abs=1e-9)


@pytest.mark.slow  # many prunes and scores end to end
def test_sweep_writes_csv_and_chart(saved_model, calibration_folder, tmp_path):
    csv, html = tmp_path / "sweep.csv", tmp_path / "sweep.html"
    done = run("sweep", "--model", str(saved_model), "--calibration", str(calibration_folder),
               "--methods", "magnitude,wanda", "--sparsities", "0.2,0.6", "--samples", "8", "--eval-n", "20",
               "--csv", str(csv), "--html", str(html))
    assert done.returncode == 0, done.stderr
    header, *rows = [line.split(",") for line in csv.read_text().splitlines()]
    assert header[:2] == ["method", "sparsity"] and len(rows) == 4
    assert {(r[0], float(r[1])) for r in rows} == {(m, s) for m in ("magnitude", "wanda") for s in (0.2, 0.6)}
    for r in rows:  # per-row rounding, floor(in * s), costs up to one weight per row on tiny widths
        assert -0.03 < float(r[header.index("achieved_sparsity")]) - float(r[1]) <= 1e-6
    assert "plotly" in html.read_text()[:100_000].lower()


@pytest.mark.slow  # many prunes and scores end to end
def test_bench_writes_every_method_side_by_side(saved_model, calibration_folder, tmp_path):
    out = tmp_path / "bench.json"
    done = run("bench", "--model", str(saved_model), "--calibration", str(calibration_folder),
               "--methods", "wanda,ecoflap_zeroth,ecoflap_first", "--samples", "8", "--stage1-samples", "8",
               "--batch-size", "4", "--held-out", "5", "--json", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert set(result["methods"]) == {"wanda", "ecoflap_zeroth", "ecoflap_first"}
    for m in result["methods"].values():
        assert m["quality"]["n"] == 5 and m["quality"]["kl_mean"] > 0 and 0 <= m["quality"]["same_top"] <= 1
    assert "same top" in done.stdout
    for name, m in result["methods"].items():
        assert set(m) >= {"stage1_s", "stage2_s", "total_s", "forward_equivalents", "peak_bytes",
                          "peak_vs_inference"}, name
        assert m["total_s"] >= m["stage1_s"] + m["stage2_s"] - 1e-3
        assert m["forward_equivalents"] == pytest.approx(m["total_s"] / result["forward_pass_s"], rel=1e-2)
        assert -0.03 < m["achieved_sparsity"] - 0.5 <= 1e-6
    assert result["methods"]["wanda"]["stage1_s"] == 0
    assert result["zeroth_stage1_speedup"] > 0 and result["zeroth_stage1_speedup_vs_reference_loop"] > 0
    assert "ecoflap_zeroth" in done.stdout
    drift, lost = result["half_precision"]["allocation"], result["half_precision"]["gradients"]
    assert set(drift) == {"float32_seeds", "bfloat16", "float16"}
    assert all(0 <= d["max_sparsity_difference"] <= 0.6 and -1 <= d["score_rank_correlation"] <= 1
               for d in drift.values())
    assert set(lost) == {"float32", "float16_unscaled", "float16_scaled"} and lost["float32"]["scale"] == 1
    assert "half precision vs float32" in done.stdout and "gradient entries lost" in done.stdout


def test_bench_arch_needs_random_init():
    done = run("bench", "--arch", "blip2-opt-2.7b")
    assert done.returncode == 2 and done.stderr.strip().startswith("error:") and "--random-init" in done.stderr
    done = run("bench", "--arch", "blip2-huge", "--random-init")
    assert done.returncode == 2 and "unknown architecture" in done.stderr


def test_eval_against_the_full_model_saved_or_pruned_now(saved_model, calibration_folder, tmp_path):
    """A pruned model saved by `prune --save` and compared with `--full` measures the same as
    pruning in the same command with `--method`: same held-out examples, same weights."""
    pruned, saved, now = tmp_path / "pruned", tmp_path / "saved.json", tmp_path / "now.json"
    # the held-out examples are the 6 after the 8 calibration samples of the folder, in both
    common = ("--calibration", str(calibration_folder), "--samples", "8", "--held-out", "6")
    assert run("prune", "--model", str(saved_model), "--method", "wanda", "--sparsity", "0.6", "--samples", "8",
               "--calibration", str(calibration_folder), "--save", str(pruned)).returncode == 0
    done = run("eval", "--model", str(pruned), "--full", str(saved_model), *common, "--json", str(saved))
    assert done.returncode == 0, done.stderr
    assert "KL(full || pruned) over" in done.stdout and "same top" in done.stdout
    done = run("eval", "--model", str(saved_model), "--method", "wanda", "--sparsity", "0.6", *common,
               "--json", str(now))
    assert done.returncode == 0, done.stderr
    a, b = json.loads(saved.read_text()), json.loads(now.read_text())
    assert a["n"] == b["n"] == 6 and a["tokens"] == b["tokens"] and a["kl_mean"] > 0
    for key in ("kl_mean", "kl_median", "kl_p99", "kl_p999", "same_top", "same_answer", "accuracy"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-8), key
    assert a["flips"] == b["flips"]
    done = run("eval", "--model", str(pruned), "--full", str(saved_model), "--method", "wanda")
    assert done.returncode == 2 and "not both" in done.stderr


@pytest.mark.slow  # many prunes and scores end to end
def test_sweep_columns_and_y_axis_against_the_full_model(saved_model, calibration_folder, tmp_path):
    csv, html, out = tmp_path / "sweep.csv", tmp_path / "sweep.html", tmp_path / "sweep.json"
    done = run("sweep", "--model", str(saved_model), "--calibration", str(calibration_folder),
               "--methods", "magnitude", "--sparsities", "0.3,0.7", "--samples", "8", "--eval-n", "10",
               "--y", "kl_mean", "--csv", str(csv), "--html", str(html), "--json", str(out))
    assert done.returncode == 0, done.stderr
    header = csv.read_text().splitlines()[0].split(",")
    assert {"kl_mean", "kl_p99", "same_top", "same_answer", "right_to_wrong", "wrong_to_right"} <= set(header)
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["kl_mean"] < rows[1]["kl_mean"]  # more zeros, further from the full model
    assert all(0 <= r["accuracy"] <= 1 for r in rows)  # a shapes vocabulary: exact match scores its answers
    assert "mean KL(full || pruned)" in html.read_text()
    assert run("sweep", "--y", "loss").returncode == 2


def test_bench_sparsegpt_layer_reports_the_peak_against_the_hessian(tmp_path):
    out = tmp_path / "layer.json"
    done = run("bench", "--sparsegpt-layer", "64x96", "--sparsegpt-layer", "96x64", "--json", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["sparsegpt_layers"]
    assert [r["shape"] for r in rows] == ["64x96", "96x64"]
    for r, (rows_, columns) in zip(rows, [(64, 96), (96, 64)]):
        assert r["hessian_mib"] == round(columns * columns * 4 / 2**20, 1)
        assert r["weight_mib"] == round(rows_ * columns * 4 / 2**20, 1)
        assert r["achieved_sparsity"] == math.floor(rows_ * columns * 0.5) / (rows_ * columns)
    assert "64x96" in done.stdout
    done = run("bench", "--sparsegpt-layer", "64by96")
    assert done.returncode == 2 and "ROWSxCOLUMNS" in done.stderr
