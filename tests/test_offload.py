"""Sequential onloading under accelerate's CPU and disk offload (the hooks a GPU run uses,
executing on the CPU here): the zeros land in the weights the forward pass reads, at most
one block is ever on the execution device, the pruned model equals the same model pruned
whole, and restores are bit-identical."""

import math

import pytest
import torch

from ecoflap import PruneOptions, WeightStore, ask, load_model, prune
from ecoflap.anatomy import INCLUDE_CHOICES, prunable_layers, stacks
from ecoflap.data import batches
from ecoflap.models import ModelLoadError
from ecoflap.offload import is_offloaded, read_weight


OPTIONS = PruneOptions(samples=8, stage1_samples=4, batch_size=4, include=INCLUDE_CHOICES)


@pytest.fixture(params=["opt", "t5"])
def family(request):
    return request.param


def _logits(loaded, batch) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(**batch).logits


def _offloaded(folder, kind, tmp_path):
    loaded = load_model(str(folder), device="cpu", offload=kind, offload_folder=str(tmp_path / "offload"))
    assert is_offloaded(loaded.model) and loaded.offload == kind
    return loaded


def _check_against_whole(saved_model, tmp_path, examples, kind, method):
    whole = load_model(str(saved_model), device="cpu")
    off = _offloaded(saved_model, kind, tmp_path)
    store = WeightStore.of(off)
    batch = batches(whole, examples[:4], 4)[0]
    dense = _logits(whole, batch)
    assert torch.equal(_logits(off, batch), dense)

    pruned_whole = prune(whole, method, 0.5, OPTIONS, examples)
    result = prune(off, method, 0.5, OPTIONS, examples)
    for a, b in zip(prunable_layers(off.model, INCLUDE_CHOICES), prunable_layers(whole.model, INCLUDE_CHOICES)):
        assert a.module.weight.device.type == "meta", a.name  # back off the device
        assert torch.equal(read_weight(a.module), b.module.weight), a.name
    assert [r["zeros"] for r in result.layers] == [r["zeros"] for r in pruned_whole.layers]
    pruned = _logits(off, batch)  # the offloaded forward reads the zeros from where they were written
    assert torch.equal(pruned, _logits(whole, batch)) and not torch.equal(pruned, dense)
    images, questions = [e.image for e in examples[:4]], [e.question for e in examples[:4]]
    assert ask(off, images, questions) == ask(whole, images, questions)

    store.restore()
    assert store.is_original()
    assert torch.equal(_logits(off, batch), dense)


def test_offloaded_wanda_equals_the_whole_model(saved_model, tmp_path, examples):
    _check_against_whole(saved_model, tmp_path, examples, "cpu", "wanda")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cpu", "disk"])
@pytest.mark.parametrize("method", ["magnitude", "sparsegpt", "ecoflap_zeroth", "ecoflap_zeroth_group", "owl",
                                    "global_magnitude", "per_modality_sparsegpt"])
def test_offloaded_methods_equal_the_whole_model(saved_model, tmp_path, examples, kind, method):
    _check_against_whole(saved_model, tmp_path, examples, kind, method)


@pytest.mark.slow
def test_offloaded_wanda_on_disk(saved_model, tmp_path, examples):
    _check_against_whole(saved_model, tmp_path, examples, "disk", "wanda")


@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_at_most_one_block_on_the_execution_device(saved_model, tmp_path, examples, kind, monkeypatch):
    """Whenever a prunable layer is called during pruning, at most one block's weights are
    on the execution device (not meta placeholders), and every layer is pruned there."""
    import ecoflap.pipeline as pipeline

    off = _offloaded(saved_model, kind, tmp_path)
    owner = {}
    for stack in stacks(off.model):
        for b, block in enumerate(stack.blocks):
            for module in block.modules():
                owner[module] = (stack.name, b)
    layers = prunable_layers(off.model, INCLUDE_CHOICES)
    calls, pruned_on_device = [], []

    def on_device():
        return {owner[layer.module] for layer in layers if layer.module.weight.device.type != "meta"}

    def check(_module, _args):
        calls.append(on_device())
        assert len(calls[-1]) <= 1, calls[-1]

    real = pipeline.prune_sparsegpt

    def watched(weight, *args, **kwargs):
        pruned_on_device.append((weight.device.type, len(on_device())))
        return real(weight, *args, **kwargs)

    monkeypatch.setattr(pipeline, "prune_sparsegpt", watched)
    handles = [layer.module.register_forward_pre_hook(check) for layer in layers]
    try:
        prune(off, "sparsegpt", 0.5, OPTIONS, examples)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) > len(layers) and any(calls)
    assert pruned_on_device == [("cpu", 1)] * len(layers)
    assert on_device() == set()


@pytest.mark.parametrize("method,options,message", [
    ("ecoflap_first", OPTIONS, "first-order"),
    ("ecoflap_zeroth_group", PruneOptions(samples=8, stage1_samples=4, granularity="model"), "joint perturbation"),
])
def test_what_offloading_cannot_do_is_one_clear_line(saved_model, tmp_path, examples, method, options, message):
    off = _offloaded(saved_model, "cpu", tmp_path)
    store = WeightStore.of(off)
    with pytest.raises(ValueError, match=message) as err:
        prune(off, method, 0.5, options, examples)
    assert "\n" not in str(err.value)
    assert store.is_original()
    from ecoflap.stats import gradient_histograms

    batch = batches(off, examples[:4], 4)[0]
    with pytest.raises(ValueError, match="gradient distributions"):
        gradient_histograms(off.model, prunable_layers(off.model), batch)


def test_offload_settings_are_checked_at_load(saved_model, tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="disk offload needs a folder"):
        load_model(str(saved_model), device="cpu", offload="disk")
    with pytest.raises(ModelLoadError, match="unknown offload"):
        load_model(str(saved_model), device="cpu", offload="gpu")
    with pytest.raises(ModelLoadError, match="not both"):
        load_model(str(saved_model), device="cpu", offload="cpu", device_map="auto")
    monkeypatch.setenv("ECOFLAP_OFFLOAD", "disk")
    monkeypatch.setenv("ECOFLAP_OFFLOAD_FOLDER", str(tmp_path / "deployment"))
    loaded = load_model(str(saved_model), device="cpu")
    assert loaded.offload == "disk" and any((tmp_path / "deployment").iterdir())


def test_prune_command_with_offload(saved_model, calibration_folder, tmp_path):
    from test_cli import run

    report = tmp_path / "report.json"
    done = run("prune", "--model", str(saved_model), "--calibration", str(calibration_folder), "--method", "wanda",
               "--samples", "8", "--offload", "cpu", "--report", str(report))
    assert done.returncode == 0, done.stderr
    import json

    result = json.loads(report.read_text())
    total = sum(r["numel"] for r in result["layers"])
    assert math.isclose(result["achieved_sparsity"], sum(r["zeros"] for r in result["layers"]) / total)
    assert result["achieved_sparsity"] > 0.45
    done = run("prune", "--model", str(saved_model), "--offload", "disk")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--offload-folder" in done.stderr


@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_an_offloaded_pruned_model_exports_its_pruned_weights(saved_model, tmp_path, examples, kind):
    from ecoflap import save_pruned

    off = _offloaded(saved_model, kind, tmp_path)
    prune(off, "wanda", 0.5, OPTIONS, examples)
    save_pruned(off, {"method": "wanda"}, tmp_path / "export")
    back = load_model(str(tmp_path / "export"), device="cpu")
    for a, b in zip(prunable_layers(off.model, INCLUDE_CHOICES), prunable_layers(back.model, INCLUDE_CHOICES)):
        assert torch.equal(read_weight(a.module), b.module.weight), a.name
    assert sum(int((b.module.weight == 0).sum()) for b in prunable_layers(back.model)) > 0


@pytest.mark.slow  # the bench command end to end, as test_cli's bench
def test_bench_runs_offloaded_and_says_what_it_leaves_out(saved_model, calibration_folder, tmp_path):
    import json

    from test_cli import run

    out = tmp_path / "bench.json"
    done = run("bench", "--model", str(saved_model), "--calibration", str(calibration_folder), "--offload", "cpu",
               "--methods", "wanda,ecoflap_zeroth", "--samples", "8", "--stage1-samples", "4", "--batch-size", "4",
               "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert "offloaded: the reference-loop timing and the half-precision comparison are not run" in done.stdout
    result = json.loads(out.read_text())
    assert set(result["methods"]) == {"wanda", "ecoflap_zeroth"}
    assert all(abs(m["achieved_sparsity"] - 0.5) < 0.03 for m in result["methods"].values())


@pytest.mark.slow
def test_a_deployment_workbench_on_disk_offload_serves_the_same_runs(saved_model, tmp_path, examples, monkeypatch):
    """ECOFLAP_OFFLOAD as a deployment sets it: runs stored, a prune stopped mid-way, each
    run's answers equal to a workbench on the model loaded whole, the full model back."""
    from ecoflap import Workbench
    from ecoflap.workbench import Cancelled

    images, questions = [e.image for e in examples[:3]], [e.question for e in examples[:3]]
    answers = []
    for offload in ("", "disk"):
        monkeypatch.setenv("ECOFLAP_OFFLOAD", offload)
        monkeypatch.setenv("ECOFLAP_OFFLOAD_FOLDER", str(tmp_path / "offload"))
        loaded = load_model(str(saved_model), device="cpu")
        assert loaded.offload == (offload or None)
        bench = Workbench(loaded)
        _, sparsegpt, _ = bench.prune("sparsegpt", 0.6, PruneOptions(samples=8), examples)
        _, wanda, _ = bench.prune("wanda", 0.6, PruneOptions(samples=8), examples)
        calls = iter(range(100))
        with pytest.raises(Cancelled):
            bench.prune("sparsegpt", 0.7, PruneOptions(samples=8), examples, should_stop=lambda: next(calls) > 1)
        answers.append(bench.ask_each(images, questions, [None, sparsegpt, wanda]))
        assert bench.restore()
    assert answers[0] == answers[1]


def test_a_transformers_device_map_with_disk_entries_is_pruned_where_it_lives(saved_model, family, tmp_path, examples):
    """The case the issue found broken: from_pretrained(device_map=...) with blocks on
    "disk" (accelerate's hooks over the checkpoint's own safetensors file). The zeros land
    in the offload folder, never in the checkpoint; same weights as pruned whole; restore."""
    from transformers import Blip2ForConditionalGeneration

    from ecoflap.models import LoadedModel

    whole = load_model(str(saved_model), device="cpu")
    language = next(s for s in stacks(whole.model) if s.modality == "language")
    on_disk = tuple(f"{n}." for n, m in whole.model.named_modules() if m in language.blocks)
    device_map = {n: "cpu" for n, _ in whole.model.named_parameters(recurse=False)}
    for name, module in whole.model.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            device_map[name] = "disk" if f"{name}.".startswith(on_disk) else "cpu"
    assert "disk" in device_map.values()
    checkpoint = (saved_model / "model.safetensors").read_bytes()
    model = Blip2ForConditionalGeneration.from_pretrained(saved_model, device_map=device_map,
                                                          offload_folder=str(tmp_path / "offload"))
    assert is_offloaded(model)
    loaded = LoadedModel(model, whole.processor, "mapped", torch.device("cpu"), torch.float32, str(saved_model))
    store = WeightStore.of(loaded)
    prune(loaded, "sparsegpt", 0.5, OPTIONS, examples)
    prune(whole, "sparsegpt", 0.5, OPTIONS, examples)
    for a, b in zip(prunable_layers(model, INCLUDE_CHOICES), prunable_layers(whole.model, INCLUDE_CHOICES)):
        assert torch.equal(read_weight(a.module), b.module.weight), a.name
    batch = batches(whole, examples[:4], 4)[0]
    assert torch.equal(_logits(loaded, batch), _logits(whole, batch))
    assert (saved_model / "model.safetensors").read_bytes() == checkpoint
    store.restore()
    assert store.is_original()
