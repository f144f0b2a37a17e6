"""Recovery: fine-tuning a pruned model never revives a zero (full and LoRA-merged), it
learns, it is one hand-worked AdamW step, the shared model is untouched, the new run is
usable everywhere a run is, a stop stores nothing, and bad settings are refused calmly."""

import json
import zipfile

import pytest
import torch
from transformers import Blip2ForConditionalGeneration

from ecoflap.anatomy import prunable_layers
from ecoflap.models import load_model
from ecoflap.options import PruneOptions
from ecoflap.data import calibration_loss, encode_examples
from ecoflap.pipeline import prune
from ecoflap.recover import RecoverOptions, recover, recover_options, training_batches
from ecoflap.serve.server import Limits
from ecoflap.shapes.evaluate import CARD_SEED, make_eval_set
from ecoflap.shapes.training import RECOVERY_SEED, fresh_batches
from ecoflap.shapes.world import samples
from ecoflap.scoring import SCORE_SEED
from ecoflap.workbench import Cancelled

from conftest import EXAMPLE, make_server, tiny_model

FAST = dict(samples=8, stage1_samples=8)
pytestmark = pytest.mark.usefixtures("few_quality_questions")


def pruned_tiny(family, examples, sparsity=0.6):
    loaded = tiny_model(family)
    result = prune(loaded, "wanda", sparsity, PruneOptions(**FAST), examples)
    names = {r["name"] for r in result.layers}
    return loaded, [layer for layer in prunable_layers(loaded.model) if layer.name in names]


@pytest.mark.parametrize("way", ["full", "lora"])
def test_every_zero_stays_zero_and_the_kept_weights_learn(family, examples, way):
    loaded, layers = pruned_tiny(family, examples)
    before = {layer.name: layer.module.weight.detach().clone() for layer in layers}
    options = RecoverOptions(steps=4, lr=1e-3, way=way, eval_n=0, batch_size=4)
    done = recover(loaded, layers, options, calibration=examples)
    for layer in layers:
        weight, old = layer.module.weight.detach(), before[layer.name]
        assert torch.equal(weight == 0, old == 0), layer.name
        assert int((weight == 0).sum()) == done.zeros_before[layer.name] == done.zeros_after[layer.name] > 0
    moved = sum(int((layer.module.weight.detach() != before[layer.name]).sum()) for layer in layers)
    assert moved > 0.5 * sum(int((before[layer.name] != 0).sum()) for layer in layers)
    if way == "lora":
        assert done.merge_densification == 0
        assert done.plain_merge_would_fill > 0  # the masked merge is what kept them
        assert done.trained_parameters == sum(options.rank * (layer.module.in_features + layer.module.out_features)
                                              for layer in layers)
    else:
        assert done.merge_densification is None
        assert done.trained_parameters == sum(int((before[layer.name] != 0).sum()) for layer in layers)


def test_the_training_loss_falls_and_is_the_real_loss(examples):
    loaded, layers = pruned_tiny("opt", examples, sparsity=0.7)
    batch = examples[:8]  # one batch, seen again at every step
    first = calibration_loss(loaded.model, encode_examples(loaded, batch)).item()
    done = recover(loaded, layers, RecoverOptions(steps=30, lr=1e-2, schedule="constant", batch_size=8, eval_n=0),
                   calibration=batch)
    assert done.losses[0] == pytest.approx(first, rel=1e-5)
    assert sum(done.losses[-5:]) / 5 < 0.9 * first
    with torch.no_grad():
        assert calibration_loss(loaded.model, encode_examples(loaded, batch)).item() < 0.9 * first


def test_one_full_step_is_adamw_on_the_masked_gradient_by_hand(examples):
    loaded, layers = pruned_tiny("opt", examples)
    lr, decay = 1e-3, 0.05
    options = RecoverOptions(steps=1, lr=lr, weight_decay=decay, schedule="constant", batch_size=8, eval_n=0)
    batch = next(training_batches(loaded, options, examples[:8])[0])
    weights = [layer.module.weight for layer in layers]
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    calibration_loss(loaded.model, encode_examples(loaded, batch)).backward()
    expected = {}
    for layer, w in zip(layers, weights):
        g = w.grad * (w != 0)
        expected[layer.name] = (w.detach() * (1 - lr * decay) - lr * g / (g.abs() + 1e-8)) * (w != 0)
        w.grad = None
    for p in loaded.model.parameters():
        p.requires_grad_(True)
    recover(loaded, layers, options, calibration=examples[:8])
    for layer in layers:
        torch.testing.assert_close(layer.module.weight.detach(), expected[layer.name], rtol=0, atol=1e-6)
        assert torch.equal(layer.module.weight == 0, expected[layer.name] == 0)


def test_fresh_scenes_are_never_the_evaluation_questions():
    fresh = [e for batch in fresh_batches(8, 50, seed=0) for e in batch]
    assert len(fresh) == 400 and {e.question for e in fresh} > {""}
    taken = {(s.scene, s.question) for s in samples(400, RECOVERY_SEED)}
    for seed in (SCORE_SEED, CARD_SEED, 4321):
        assert not taken & {(s.scene, s.question) for s in samples(1000, seed)}
    held_out = make_eval_set(20, SCORE_SEED)
    assert all(a.image.tobytes() != b.image.tobytes() for a in fresh[:20] for b in held_out)


def test_a_recovered_run_is_a_run_and_the_shared_model_is_untouched(model_folder, tmp_path):
    server = make_server(model_folder, tmp_path)
    me = server.open_session()
    bench = me.workbench
    state = {n: p.detach().clone() for n, p in bench.loaded.model.named_parameters()}
    flags = {n: p.requires_grad for n, p in bench.loaded.model.named_parameters()}
    full_answer = me.ask(EXAMPLE, "what color is the circle?").full
    run = me.prune("wanda", 0.5, **FAST)
    steps = []
    better = me.recover(run.id, steps=5, lr=1e-3, eval_n=10, on_step=lambda i, loss: steps.append(i))
    model = bench.loaded.model
    assert all(torch.equal(p, state[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert bench.store.is_original()
    assert better.label == "Wanda @ 0.50 + 5 steps" and [r.id for r in me.runs()] == [run.id, better.id]
    report = better.result.to_dict()["recovery"]
    assert steps == [1, 2, 3, 4, 5] and len(report["losses"]) == 5 and report["from"] == run.label
    assert report["options"]["steps"] == 5 and report["options"]["lr"] == 1e-3
    assert report["before"]["n"] == report["after"]["n"] == 10 and report["seconds"] > 0
    assert report["zeros_before"] == report["zeros_after"]
    assert better.result.achieved_sparsity == run.result.achieved_sparsity
    assert [r["zeros"] for r in better.result.layers] == [r["zeros"] for r in run.result.layers]
    with better.weights.applied(bench.store):
        for name in run.weights.names:
            weight = bench.store.layers[name].weight
            assert torch.equal(weight == 0, run.weights.mask(name).to(weight.device)), name
    answers = me.ask(EXAMPLE, "what color is the circle?")
    assert answers.full == full_answer and [a["label"] for a in answers.runs] == [run.label, better.label]
    assert set(me.distributions(better.id)["series"]) == {"full", better.label}
    again = me.recover(better.id, steps=2, way="lora", eval_n=0)
    assert again.label == "Wanda @ 0.50 + 5 steps + 2 steps (LoRA)"
    assert again.result.recovery["merge_densification"] == 0
    assert all(torch.equal(p, state[n]) for n, p in model.named_parameters())


def test_an_exported_recovered_model_loads_with_plain_transformers_with_the_same_zeros(model_folder, tmp_path):
    me = make_server(model_folder, tmp_path).open_session()
    run = me.prune("magnitude", 0.6)
    better = me.recover(run.id, steps=3, lr=1e-3, eval_n=0)
    archive = next(p for p in me.export(better.id, with_model=True) if p.suffix == ".zip")
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(archive).extractall(unpacked)
    model = Blip2ForConditionalGeneration.from_pretrained(unpacked)
    for name in run.weights.names:
        weight = model.get_submodule(name).weight.detach()
        assert torch.equal(weight == 0, run.weights.mask(name)), name
        assert torch.equal(weight, better.weights.dense[name]), name
    assert (unpacked / "ecoflap_report.json").read_text().count('"recovery"') == 1


def test_a_stop_mid_way_stores_nothing(model_folder, tmp_path):
    me = make_server(model_folder, tmp_path).open_session()
    run = me.prune("wanda", 0.5, **FAST)
    seen = []
    with pytest.raises(Cancelled):
        me.recover(run.id, steps=50, eval_n=0, on_step=lambda i, loss: seen.append(i),
                   should_stop=lambda: len(seen) >= 3)
    assert len(seen) == 3
    assert [r.id for r in me.runs()] == [run.id]
    assert me.workbench.store.is_original()


@pytest.fixture(scope="module")
def one_run(shared_model_folder, tmp_path_factory, few_quality_questions):
    """A session (at most 20 recovery steps) holding one run, shared by the refusal tests:
    each refusal must leave it so."""
    me = make_server(shared_model_folder, tmp_path_factory.mktemp("deployment"), recover_steps=20).open_session()
    return me, me.prune("magnitude", 0.5)


@pytest.mark.parametrize("settings,error,message", [
    (dict(steps=None), ValueError, "give the number of fine-tuning steps"),
    (dict(steps=""), ValueError, "give the number of fine-tuning steps"),
    (dict(steps=0), ValueError, "steps must be a whole number from 1 to 20"),
    (dict(steps=2.5), ValueError, "steps must be a whole number from 1 to 20"),
    (dict(steps=21), ValueError, "steps must be a whole number from 1 to 20"),
    (dict(steps=5, lr=-1e-3), ValueError, "the learning rate must be positive"),
    (dict(steps=5, lr="fast"), ValueError, "the learning rate must be a number"),
    (dict(steps=5, way="dense"), ValueError, "the way to recover is 'full'"),
    (dict(steps=5, schedule="linear"), ValueError, "the schedule is 'cosine' or 'constant'"),
    (dict(steps=5, batch_size=0), ValueError, "batch size must be a whole number"),
    (dict(steps=5, weight_decay=-1), ValueError, "weight decay must be a number"),
])
def test_bad_settings_get_one_clear_message_and_change_nothing(one_run, settings, error, message):
    me, run = one_run
    with pytest.raises(error, match=message):
        me.recover(run.id, **settings)
    assert [r.id for r in me.runs()] == [run.id] and me.workbench.store.is_original()


def test_a_run_that_does_not_exist_is_refused(model_folder, tmp_path):
    server = make_server(model_folder, tmp_path)
    me, other = server.open_session(), server.open_session()
    theirs = other.prune("magnitude", 0.5)
    for run_id in ("run-nope", theirs.id, None, 3):
        with pytest.raises(KeyError, match="no run with that id in this session"):
            me.recover(run_id, steps=5)


def test_the_step_cap_comes_from_the_environment():
    assert Limits.from_environment({"ECOFLAP_MAX_RECOVER_STEPS": "40"}).recover_steps == 40
    assert Limits().recover_steps == 300
    with pytest.raises(ValueError, match="ECOFLAP_MAX_RECOVER_STEPS must be a whole number"):
        Limits.from_environment({"ECOFLAP_MAX_RECOVER_STEPS": "lots"})


def test_options_from_raw_values_keep_the_reference_defaults():
    assert recover_options("200") == RecoverOptions(steps=200, lr=2e-5, weight_decay=0.05, schedule="cosine")


def test_the_command_line_recovers_a_saved_folder_and_keeps_its_zeros(saved_model, calibration_folder, tmp_path):
    from test_cli import run

    pruned, out, report = tmp_path / "pruned", tmp_path / "recovered", tmp_path / "recovered.json"
    assert run("prune", "--model", str(saved_model), "--method", "wanda", "--sparsity", "0.6", "--calibration",
               str(calibration_folder), "--samples", "16", "--save", str(pruned)).returncode == 0
    done = run("recover", "--model", str(pruned), "--steps", "3", "--lr", "1e-3", "--eval-n", "0", "--way", "lora",
               "--calibration", str(calibration_folder), "--samples", "32", "--save", str(out), "--report", str(report))
    assert done.returncode == 0, done.stderr
    assert "zeros per layer identical" in done.stdout and "LoRA merge densification: 0" in done.stdout
    data = json.loads(report.read_text())
    assert data["recovery"]["options"]["steps"] == 3 and len(data["recovery"]["losses"]) == 3
    before, after = load_model(str(pruned), device="cpu").model, load_model(str(out), device="cpu").model
    for row in data["layers"]:
        old, new = before.get_submodule(row["name"]).weight, after.get_submodule(row["name"]).weight
        assert torch.equal(old == 0, new == 0) and not torch.equal(old, new), row["name"]
        assert row["zeros"] == int((new == 0).sum())


@pytest.mark.parametrize("args,message", [
    ([], "give the number of fine-tuning steps"),
    (["--steps", "0"], "steps must be a whole number"),
    (["--steps", "5", "--lr", "-0.1"], "the learning rate must be positive"),
])
def test_the_command_line_refuses_bad_settings_in_one_line(saved_model, args, message):
    from test_cli import run

    done = run("recover", "--model", str(saved_model), *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error:") and message in done.stderr


def test_the_command_line_wants_a_folder_prune_wrote(saved_model):
    from test_cli import run

    done = run("recover", "--model", str(saved_model), "--steps", "5")
    assert done.returncode == 2 and "a folder that `python -m ecoflap prune --save` wrote" in done.stderr


def test_shipped_recovery_is_summarised_over_seeds_and_said_in_one_sentence(tmp_path):
    from ecoflap.curves import recovery_sentence, shipped_recovery
    from ecoflap.plots import loss_figure

    rows = [{"method": "ecoflap_zeroth", "label": "ECoFLaP", "sparsity": 0.7, "steps": 100, "lr": 2e-5, "seed": s,
             "before": b, "after": a, "recover_cpu_s": c} for s, b, a, c in [(0, 0.5, 0.7, 10), (1, 0.6, 0.9, 20)]]
    rows.append({**rows[0], "method": "wanda", "label": "Wanda", "before": 0.4, "after": 0.6})
    (tmp_path / "recovery.json").write_text(json.dumps({"rows": rows}))
    summary = {r["method"]: r for r in shipped_recovery(str(tmp_path))}
    ours = summary["ecoflap_zeroth"]
    assert (ours["seeds"], ours["after_min"], ours["after_max"], ours["cpu_s"]) == (2, 0.7, 0.9, 15)
    assert ours["before"] == pytest.approx(0.55) and ours["after"] == pytest.approx(0.8)
    assert recovery_sentence(list(summary.values())) == (
        "Recovery measured on this model (fine-tuning with every zero held, lr 2e-05): at 0.7 after 100 steps: "
        "ECoFLaP 55.0% → 80.0%, Wanda 40.0% → 60.0%.")
    assert shipped_recovery(str(tmp_path / "elsewhere")) is None
    from ecoflap.toy.card import recovery_gaps, recovery_table

    assert recovery_gaps(list(summary.values())) == (
        "Wanda minus ECoFLaP, accuracy (means over seeds): at 0.7: -15.0 points before, -20.0 after 100 steps.")
    table = recovery_table(list(summary.values()), 0.9).splitlines()
    assert table[2] == "| full model | 0 | 90.0% |  | |"
    assert table[3] == "| ECoFLaP, 2 seeds | 0.7 | 55.0% (50.0% to 60.0%) | 80.0% (70.0% to 90.0%) | 15 |"
    figure = loss_figure([1.0] * 5 + [0.0] * 10, steps=40)
    assert list(figure.data[1].y)[-1] == 0.0 and figure.data[1].y[9] == 0.5 and figure.layout.xaxis.range == (1, 40)


def test_shipped_lora_recovery_is_its_own_row_beside_the_full_way(tmp_path):
    from ecoflap.curves import recovery_sentence, shipped_recovery
    from ecoflap.toy.card import recovery_gaps, recovery_table

    def row(method, label, way, before, after, **more):
        return {"method": method, "label": label, "sparsity": 0.7, "steps": 100, "lr": 2e-5, "seed": 0,
                "before": before, "after": after, "recover_cpu_s": 10, **({"way": way} if way else {}), **more}

    rows = [row("wanda", "Wanda", None, 0.4, 0.6), row("ecoflap_zeroth", "ECoFLaP", "full", 0.5, 0.7),
            row("wanda", "Wanda", "lora", 0.4, 0.45, rank=8, merge_densification=0),
            row("ecoflap_zeroth", "ECoFLaP", "lora", 0.5, 0.52, rank=8, merge_densification=0)]
    (tmp_path / "recovery.json").write_text(json.dumps({"rows": rows}))
    summary = shipped_recovery(str(tmp_path))
    assert [(r["method"], r["way"], r["after"], r["merge_densification"]) for r in summary] == [
        ("wanda", "full", 0.6, None), ("ecoflap_zeroth", "full", 0.7, None),
        ("wanda", "lora", 0.45, 0), ("ecoflap_zeroth", "lora", 0.52, 0)]
    assert recovery_sentence(summary) == (  # the Teach tab speaks of the Recover tab's default way
        "Recovery measured on this model (fine-tuning with every zero held, lr 2e-05): at 0.7 after 100 steps: "
        "Wanda 40.0% → 60.0%, ECoFLaP 50.0% → 70.0%.")
    assert recovery_table(summary).splitlines()[2:] == [
        "| Wanda | 0.7 | 40.0% | 60.0% | 10 |", "| ECoFLaP | 0.7 | 50.0% | 70.0% | 10 |",
        "| Wanda, masked LoRA rank 8 | 0.7 | 40.0% | 45.0% | 10 |",
        "| ECoFLaP, masked LoRA rank 8 | 0.7 | 50.0% | 52.0% | 10 |"]
    from ecoflap.toy.card import lora_commands

    rows.append(row("wanda", "Wanda", "lora", 0.4, 0.5, rank=8, merge_densification=0, lr=1e-4, seed=0))
    assert lora_commands({"command": "c", "rows": rows}) == ["`c --way lora --seeds 0`",
                                                             "`c --way lora --lr 0.0001 --seeds 0`"]
    assert recovery_gaps(summary).split("\n\n") == [
        "ECoFLaP minus Wanda, accuracy (means over seeds): at 0.7: +10.0 points before, +10.0 after 100 steps.",
        "ECoFLaP minus Wanda (masked LoRA, lr 2e-05), accuracy (means over seeds): at 0.7: +10.0 points before, "
        "+7.0 after 100 steps."]
