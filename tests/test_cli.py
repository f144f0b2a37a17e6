"""The command line, end to end on tiny models saved to local folders."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecoflap.models import ModelLoadError, load_model

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "ecoflap", *args], capture_output=True, text=True, env=env, cwd=ROOT)


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
    assert data["method"] == method and data["target_sparsity"] == 0.6
    assert set(data["layers"][0]) >= {"name", "modality", "block", "numel", "sparsity"}
    assert data["timings"]["total_s"] > 0
    if method == "ecoflap":
        assert data["groups"] and set(data["groups"][0]) >= {"name", "numel", "score", "sparsity"}
        assert data["options"]["max_sparsity"] == pytest.approx(0.7)
    reloaded = load_model(str(out), device="cpu")
    zeros = sum(int((reloaded.model.get_submodule(r["name"]).weight == 0).sum()) for r in data["layers"])
    numel = sum(r["numel"] for r in data["layers"])
    assert zeros / numel == pytest.approx(data["achieved_sparsity"])
    assert json.loads((out / "ecoflap_report.json").read_text())["method"] == method
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent/model"], "no model folder"),
        (["--method", "nope"], "unknown method"),
        (["--sparsity", "1.2"], "[0, 1)"),
        (["--nm", "4:2"], "N:M"),
        (["--method", "ecoflap", "--max-sparsity", "0.3"], "below the target"),
    ],
)
def test_prune_bad_input_is_one_clear_line(saved_model, args, message):
    model = [] if args[0] == "--model" else ["--model", str(saved_model)]
    done = run("prune", *model, *args)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last
    assert "Traceback" not in done.stderr


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
    lines = [json.loads(l) for l in done.stdout.strip().splitlines()]
    assert [(l["image"], l["question"]) for l in lines] == [(r["image"], r["question"]) for r in rows]
    assert all(isinstance(l["answer"], str) for l in lines)


def test_load_model_errors(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelLoadError, match="not BLIP-2"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_model(str(tmp_path.parent), device="cpu")


def test_t5_refuses_float16(tmp_path):
    from conftest import tiny_model

    loaded = tiny_model("t5")
    loaded.model.save_pretrained(tmp_path)
    loaded.processor.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="float16"):
        load_model(str(tmp_path), device="cpu", dtype="float16")
    assert load_model(str(tmp_path), device="cpu", dtype="bfloat16").model.dtype == torch.bfloat16
