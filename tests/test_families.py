"""Every family beyond BLIP-2, end to end on tiny random models, against independent references.

References are the test's own: plain forward passes with hooks of its own, each example
alone (batch size 1 has no padding and its own image tokens), the model's own
`generate` on the processor's own encoding, bit-for-bit copies of the weights.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from ecoflap import plots
from ecoflap.allocation import allocate_sparsity
from ecoflap.anatomy import INCLUDE_CHOICES, MODALITIES, parameter_counts, prunable_layers, stacks
from ecoflap.answers import ask
from ecoflap.data import batches, calibration_loss
from ecoflap.importance import first_order_scores, zeroth_order_scores
from ecoflap.models import ModelLoadError, load_model
from ecoflap.options import PruneOptions
from ecoflap.pipeline import prune
from ecoflap.pruners.masks import per_row_count
from ecoflap.weights import WeightStore

from conftest import EXAMPLE, ROOT, assert_replay_sees_inputs_alone, make_server, masks_at_batch_sizes, saved
from tiny_families import BUILDERS, tiny, varied_examples

FAMILIES = list(BUILDERS)
CHAT = {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm"}
CAPTION = "Provide a one-sentence caption for the provided image."


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread than on several that share a CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def examples():
    return varied_examples(16)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def _block_of(model, module):
    """(stack name, index) of the transformer block (or projection) holding a module."""
    for stack in stacks(model):
        for b, block in enumerate(stack.blocks):
            if any(m is module for m in block.modules()):
                return stack.name, b
    raise AssertionError("module outside every stack")


def test_stacks_in_forward_order_and_what_is_pruned_by_default(family):
    loaded = tiny(family)
    model = loaded.model
    order = [s.modality for s in stacks(model)]
    assert order[0] == "vision" and order[-1] == "language" and set(order) <= set(MODALITIES)
    assert [MODALITIES.index(m) for m in order] == sorted(MODALITIES.index(m) for m in order)
    default = prunable_layers(model)
    assert {layer.modality for layer in default} == {"vision", "language"}
    names = [s.name for s in stacks(model)]
    order = [(names.index(layer.stack), layer.block) for layer in default]
    assert order == sorted(order)
    everything = prunable_layers(model, INCLUDE_CHOICES)
    counts = parameter_counts(model)
    assert counts["prunable"] == sum(layer.numel for layer in default)
    unused = {name: model.get_submodule(name) for name in counts["unused"]}
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    inside_unused = {name for name in linears if any(name == u or name.startswith(u + ".") for u in unused)}
    # Every linear layer of the stacks is prunable on request, or computed for nothing.
    assert {layer.name for layer in everything} == linears - inside_unused - {"lm_head", "language_model.lm_head"}
    if family in ("llava", "llava_next"):
        assert list(unused) == ["model.vision_tower.encoder.layers.1"]
        assert "vision_feature_layer=-2" in counts["unused"]["model.vision_tower.encoder.layers.1"]
    if family.startswith("instructblip"):
        assert set(unused) == {"qformer.encoder.layer.1.intermediate.dense", "qformer.encoder.layer.1.output.dense"}
    # What is marked unused never reaches the output: changing it changes nothing.
    batch = batches(loaded, varied_examples(4), 4)[0]
    with torch.no_grad():
        before = calibration_loss(model, batch)
        for module in unused.values():
            for p in module.parameters():
                p.add_(1.0)
        assert torch.equal(calibration_loss(model, batch), before)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_uniform_methods_hit_exact_counts_and_two_four(family, examples, method):
    loaded = tiny(family)
    store = WeightStore.of(loaded)
    options = PruneOptions(samples=8, batch_size=4, include=INCLUDE_CHOICES)
    result = prune(loaded, method, 0.5, options, examples)
    for row in result.layers:
        weight = loaded.model.get_submodule(row["name"]).weight
        rows, columns = weight.shape
        if method == "wanda":
            assert ((weight == 0).sum(1) == per_row_count(columns, 0.5)).all(), row["name"]
        else:
            assert row["zeros"] == math.floor(rows * columns * 0.5), row["name"]
    weights = [loaded.model.get_submodule(r["name"]).weight for r in result.layers]
    assert result.achieved_sparsity == sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    store.restore()
    result = prune(loaded, method, 0.5, PruneOptions(samples=8, batch_size=4, include=INCLUDE_CHOICES, nm="2:4"),
                   examples)
    for row in result.layers:
        weight = loaded.model.get_submodule(row["name"]).weight
        assert ((weight == 0).reshape(weight.shape[0], -1, 4).sum(-1) == 2).all(), row["name"]


def test_ecoflap_allocation_is_an_exact_recomputable_budget(family, examples):
    """Group scores are the sums of the matrices' own scores over the test's own grouping
    (by the block module holding each matrix), keep counts those of the allocation on
    them, and the model keeps exactly floor(N (1 - s)) weights. The zeroth-order scores
    replayed from the perturbed block equal running the whole model, and the first-order
    ones with activation checkpointing equal plain autograd."""
    loaded = tiny(family)
    model, sparsity, cap = loaded.model, 0.5, 0.6
    store = WeightStore.of(loaded)
    options = dict(samples=4, stage1_samples=4, batch_size=4)
    layers = prunable_layers(model)
    data = batches(loaded, examples[:4], 4)
    scores = {"ecoflap_zeroth": zeroth_order_scores(model, layers, data, seed=0),
              "ecoflap_first": first_order_scores(model, layers, data)}
    whole = zeroth_order_scores(model, layers, data, seed=0, replay=False)
    resolution = 4 * torch.finfo(torch.float32).eps * 4 / 2e-3
    for name, value in whole.items():
        assert abs(scores["ecoflap_zeroth"][name] - value) <= 1e-3 * value + resolution, name
    for name, value in first_order_scores(model, layers, data, checkpoint=False).items():
        assert scores["ecoflap_first"][name] == pytest.approx(value, rel=1e-4, abs=1e-9), name
    key = {"layer": lambda layer: layer.name, "block": lambda layer: _block_of(model, layer.module),
           "model": lambda layer: layer.modality}
    total = sum(layer.numel for layer in layers)
    for method, layer_scores in scores.items():
        for granularity, group_of in key.items():
            result = prune(loaded, method, sparsity, PruneOptions(granularity=granularity, **options), examples)
            groups: dict = {}
            for layer in layers:
                groups.setdefault(group_of(layer), []).append(layer)
            expected = allocate_sparsity([sum(layer_scores[layer.name] for layer in g) for g in groups.values()],
                                         [sum(layer.numel for layer in g) for g in groups.values()], sparsity, cap)
            assert [g["keep"] for g in result.groups] == expected, (method, granularity)
            zeros = {r["name"]: r["zeros"] for r in result.layers}
            for g, keep in zip(groups.values(), expected):
                assert sum(zeros[layer.name] for layer in g) == sum(layer.numel for layer in g) - keep
            assert total - sum(zeros.values()) == math.floor(total * (1 - sparsity))
            store.restore()


def test_sequential_calibration_sees_what_a_plain_forward_sees(family, examples):
    """Nothing pruned: block by block, padded batches with image tokens of different counts
    give every layer exactly the rows of plain forward passes over each example alone."""
    # float32 sums of hundreds of rows: entries that cancel out are exact to ~1e-6 of the largest
    assert_replay_sees_inputs_alone(tiny(family), examples[:8], 4, scaled=True)


def test_tokenizers_that_pad_on_the_left_give_the_same_batches(family, examples):
    """Hub tokenizers often pad on the left; calibration batches are always padded on the right."""
    from ecoflap.data import encode_examples

    loaded = tiny(family)
    right = encode_examples(loaded, examples[:4])
    for tokenizer in (loaded.processor.tokenizer, getattr(loaded.processor, "qformer_tokenizer", None)):
        if tokenizer is not None:
            tokenizer.padding_side = "left"
    left = encode_examples(loaded, examples[:4])
    assert right.keys() == left.keys()
    for key, value in right.items():
        assert torch.equal(value, left[key]), key


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_masks_do_not_depend_on_the_batch_size(family, examples, method):
    """Wanda's norms are sums of squares: equal masks. SparseGPT's Hessian sums in another
    order per batch size (relative differences near 1e-7), which can swap a near-tie at the
    threshold: the same count, and at most 0.5% of a layer's entries in other places."""
    masks = masks_at_batch_sizes(tiny(family), method, (1, 4), examples, samples=8)
    for name, mask in masks[0].items():
        other = masks[1][name]
        if method == "wanda":
            assert torch.equal(mask, other), name
        else:
            assert int(mask.sum()) == int(other.sum()), name
            assert int((mask != other).sum()) <= 0.005 * mask.numel(), name


def test_a_saved_folder_loads_prunes_restores_and_answers(family, tmp_path):
    """From a save_pretrained folder with the shipped calibration set (captions): ECoFLaP
    with the defaults, then SparseGPT on every module set; the full weights come back bit
    for bit, read from the checkpoint itself (no copy kept)."""
    folder = saved(tiny(family), tmp_path / family)
    loaded = load_model(str(folder), device="cpu")
    assert loaded.family == tiny(family).family and loaded.name == family
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    store = WeightStore.of(loaded)
    assert store.copied_bytes == 0 and len(store.in_file) == len(store.layers)
    result = prune(loaded, "ecoflap", 0.5, PruneOptions(samples=8, stage1_samples=8))
    total = sum(r["numel"] for r in result.layers)
    assert total - sum(r["zeros"] for r in result.layers) == math.floor(total * 0.5)
    store.restore()
    prune(loaded, "sparsegpt", 0.6, PruneOptions(samples=8, include=INCLUDE_CHOICES))
    assert not store.is_original()
    store.restore()
    assert store.is_original()
    for n, p in loaded.model.named_parameters():
        assert torch.equal(p, before[n]), n


def _reference_answer(loaded, family, image, question, max_new_tokens):
    """The model's own greedy answer on the processor's own encoding of the family's prompt."""
    processor = loaded.processor
    if family in CHAT:
        content = [{"type": "image"}, {"type": "text", "text": question or CAPTION}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=False)
    elif family.startswith("instructblip"):
        prompt = question or "A short image caption:"
    else:
        prompt = "<image>" + (f"answer en {question}" if question else "caption en")
    images = [[image]] if family in ("idefics3", "smolvlm") else [image]
    inputs = processor(images=images, text=[prompt], return_tensors="pt")
    inputs.pop("labels", None)
    with torch.no_grad():
        out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    if loaded.decoder_only:  # the prompt comes back first
        out = out[:, inputs["input_ids"].shape[1]:]
    return processor.batch_decode(out, skip_special_tokens=True)[0].strip()


def test_ask_answers_as_the_model_itself_generates(family, examples):
    loaded = tiny(family)
    images = [ex.image for ex in examples[:4]]
    questions = ["", "what color is the circle?", "", "what color is the circle?"]
    answers = ask(loaded, images, questions, max_new_tokens=4)
    expected = [_reference_answer(loaded, family, i, q, 4) for i, q in zip(images, questions)]
    assert answers == expected
    assert any(answers)


def test_llava_prompts_are_the_chat_template_with_the_image_first(examples):
    """USER: <image>, the question (a caption request when empty), ASSISTANT:, then the
    answer and </s>: the labels are exactly the answer's tokens and the end token."""
    from ecoflap.data import encode_examples

    loaded = tiny("llava")
    tokenizer = loaded.processor.tokenizer
    for example in examples[:4]:
        batch = encode_examples(loaded, [example])
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        prompt = "USER: " + "<image>" * 16 + "\n" + (example.question or CAPTION) + " ASSISTANT:"
        assert ids[labels == -100].tolist() == tokenizer(prompt)["input_ids"]
        answer = tokenizer(" " + example.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert labels[labels != -100].tolist() == answer


@pytest.mark.usefixtures("few_quality_questions")
def test_the_app_session_loads_a_local_folder_and_draws_its_chart(tmp_path):
    """What "Load another model" does, through the library the app calls (local folders
    allowed, as with ECOFLAP_LOCAL_MODELS=1)."""
    server = make_server(saved(tiny("instructblip"), tmp_path / "instructblip"), tmp_path, allow_local_models=True)
    me = server.open_session()
    for family in ("llava", "qwen2_5_vl", "smolvlm"):
        folder = saved(tiny(family), tmp_path / family)
        assert me.load_model(str(folder)).startswith(f"Loaded {family}.")
        info = me.describe()
        assert info["family"] == tiny(family).family and info["prunable"] > 0
        run = me.prune("ecoflap_zeroth", 0.5, samples=8, stage1_samples=8)
        rows = run.result.layers
        figure = plots.sparsity_figure([{"label": run.label, "layers": rows, "target_sparsity": 0.5}])
        assert list(figure.data[0].marker.color) == [plots.MODALITY_COLORS[r["modality"]] for r in rows]
        assert [r["name"] for r in rows] == [layer.name for layer in prunable_layers(me.workbench.loaded.model)]
        assert not any(name.startswith(tuple(info["unused"])) for name in (r["name"] for r in rows))
        assert plots.group_scores_figure([{"label": run.label, "groups": run.result.groups}]).data
        assert set(me.distributions(run.id)["series"]["full"]["weights"]) == {"vision", "language"}
        assert me.ask(str(EXAMPLE)).full is not None


def test_unknown_families_get_one_clear_line(tmp_path, capsys):
    from ecoflap.__main__ import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(ModelLoadError) as refused:
        load_model(str(tmp_path), device="cpu")
    message = str(refused.value)
    assert "'gemma3' model" in message and all(
        name in message for name in ("BLIP-2", "InstructBLIP", "LLaVA-1.5", "LLaVA-NeXT", "Qwen2-VL", "Qwen2.5-VL",
                                     "PaliGemma", "Idefics3", "SmolVLM"))
    assert main(["ask", "--model", str(tmp_path), "--image", str(EXAMPLE)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "gemma3" in err[0]


def _cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ecoflap", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


@pytest.mark.slow
def test_cli_prunes_a_qwen2_vl_folder_and_the_pruned_model_answers(tmp_path, capsys):
    """Qwen2-VL's processor needs torchvision for videos: loaded without, said in one line."""
    from ecoflap.__main__ import main

    folder = saved(tiny("qwen2_vl"), tmp_path / "qwen")
    done = _cli("prune", "--model", str(folder), "--method", "ecoflap", "--samples", "8", "--stage1-samples", "8",
                "--report", str(tmp_path / "report.json"), "--save", str(tmp_path / "pruned"))
    assert done.returncode == 0, done.stderr
    assert "achieved 0.5000" in done.stdout
    notes = [line for line in done.stderr.splitlines() if "torchvision" in line]
    assert len(notes) == 1 and "video processor" in notes[0]
    report = json.loads((tmp_path / "report.json").read_text())
    assert {r["modality"] for r in report["layers"]} == {"vision", "language"}
    assert main(["ask", "--model", str(tmp_path / "pruned"), "--image", str(EXAMPLE), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.slow
def test_cli_answers_with_a_smolvlm_folder(tmp_path):
    """SmolVLM's processor also wants num2words, for video timestamps only."""
    folder = saved(tiny("smolvlm"), tmp_path / "smolvlm")
    done = _cli("ask", "--model", str(folder), "--image", str(EXAMPLE), "--question", "what color is the circle?",
                "--max-new-tokens", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "Traceback" not in done.stderr


@pytest.mark.parametrize("arch,parameters,image_tokens", [
    ("llava-1.5-7b", 7_063_427_072, 576),  # 336 px crop: 24 x 24 patches of 14 px
    ("qwen2.5-vl-7b", 8_292_166_656, 49),  # 191 px resized to 196: 7 x 7 merged units of 28 px
])
def test_bench_architectures_have_their_published_sizes(arch, parameters, image_tokens):
    """Built on the meta device: the architecture without its weights. The first shipped
    calibration image (191 px square) becomes the published number of image tokens."""
    from ecoflap.data import default_calibration, encode_examples
    from ecoflap.synthetic import random_model

    loaded = random_model(arch, device="meta")
    model = loaded.model
    assert sum(p.numel() for p in model.parameters()) == parameters
    counts = parameter_counts(model)
    assert counts["prunable"] == sum(counts["prunable_by_modality"][m] for m in ("vision", "language"))
    batch = encode_examples(loaded, list(default_calibration()[:1]))
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == image_tokens
    assert (batch["labels"] != -100).sum() > 0
