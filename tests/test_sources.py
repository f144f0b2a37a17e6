"""Calibration sources: datasets built here (parquet, save_to_disk) read through the code a hub id
takes, self-labelled images, the prefix-LM loss, what the report records, and every bad source."""

from __future__ import annotations

import hashlib
import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

import ecoflap.sweep
from ecoflap import sources
from ecoflap.answers import ask
from ecoflap.data import Example, encode_examples
from ecoflap.families.base import IGNORE
from ecoflap.losses import caption_text, examples_for, prefix_lm
from ecoflap.options import PruneOptions
from ecoflap.pipeline import prune
from ecoflap.sources import SourceError, parse

from conftest import WORDS, make_server, saved, tiny_model
from test_cli import run

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.usefixtures("few_quality_questions")


def rows(n: int, seed: int = 0, size: int = 32) -> tuple[list[Image.Image], list[str]]:
    rng, state = random.Random(seed), np.random.RandomState(seed)
    images = [Image.fromarray((state.rand(size, size + i % 3, 3) * 255).astype("uint8")) for i in range(n)]
    captions = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) for _ in range(n)]
    return images, captions


def table(images, captions, image_feature=None, **extra):
    features = datasets.Features({"image": image_feature or datasets.Image(), "caption": datasets.Value("string"),
                                  **{k: datasets.Value("int64") for k in extra}})
    return datasets.Dataset.from_dict({"image": images, "caption": captions, **extra}, features=features)


@pytest.fixture
def parquet_folder(tmp_path):
    images, captions = rows(12)
    folder = tmp_path / "tiny-captions"
    (folder / "data").mkdir(parents=True)
    table(images[:8], captions[:8], id=list(range(8))).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    table(images[8:], captions[8:], id=list(range(8, 12))).to_parquet(
        str(folder / "data" / "test-00000-of-00001.parquet"))
    return folder, images, captions


@pytest.fixture
def saved_folder(tmp_path):
    images, captions = rows(10, seed=1)
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": table(images[:6], captions[:6]), "validation": table(images[6:], captions[6:])}
                         ).save_to_disk(str(folder))
    return folder, images, captions


def pixels(image: Image.Image) -> bytes:
    return image.convert("RGB").tobytes()


def independent_digest(images, questions, answers) -> str:
    """SHA-256 over (mode, size, pixels, question, answer) of each example, written out here."""
    total = hashlib.sha256()
    for image, question, answer in zip(images, questions, answers):
        one = hashlib.sha256()
        one.update(f"RGB {image.size}".encode())
        one.update(image.convert("RGB").tobytes())
        one.update(b"\0" + question.encode() + b"\0" + answer.encode())
        total.update(one.digest())
    return total.hexdigest()


def test_parquet_folder_gives_rows_in_order_and_a_disjoint_held_out_set(parquet_folder):
    folder, images, captions = parquet_folder
    source = parse(str(folder))
    assert source.kind == "dataset"
    drawn = source.draw(5, held_out=3)
    assert [e.answer for e in drawn.examples] == captions[:5]
    assert [pixels(e.image) for e in drawn.examples] == [pixels(i) for i in images[:5]]
    assert [e.answer for e in drawn.held_out] == captions[5:8]
    assert drawn.record | {"count": 5} == {"kind": "dataset", "id": "tiny-captions", "split": "train",
                                           "columns": {"image": "image", "text": "caption"}, "count": 5,
                                           "targets": "the source's own text"}
    assert drawn.report()["sha256"] == independent_digest(images[:5], [""] * 5, captions[:5])
    assert drawn.report(2)["sha256"] == independent_digest(images[:2], [""] * 2, captions[:2])
    test = parse(f"{folder}:test").draw(4)
    assert test.record["split"] == "test" and [e.answer for e in test.examples] == captions[8:]


def test_held_out_never_repeats_a_calibration_example(tmp_path):
    images, captions = rows(6)
    images[4], captions[4] = images[1], captions[1]  # a duplicate row after the calibration part
    folder = tmp_path / "dup"
    folder.mkdir()
    table(images, captions).to_parquet(str(folder / "train.parquet"))
    drawn = parse(str(folder)).draw(3, held_out=3)
    assert [e.answer for e in drawn.held_out] == [captions[3], captions[5]]


def test_save_to_disk_folder_and_split(saved_folder):
    folder, images, captions = saved_folder
    drawn = parse(str(folder)).draw(6)
    assert drawn.record["split"] == "train" and [e.answer for e in drawn.examples] == captions[:6]
    validation = parse(str(folder), split="validation").draw(4)
    assert [pixels(e.image) for e in validation.examples] == [pixels(i) for i in images[6:]]


def test_hub_id_takes_the_same_streaming_code_as_a_folder(parquet_folder, monkeypatch):
    """Past listing the repository's files, a hub id is read exactly as a local folder:
    load_dataset(<builder>, data_files=..., streaming=True)."""
    folder, images, captions = parquet_folder
    calls = []
    real = datasets.load_dataset

    def spy(builder, **kwargs):
        calls.append((builder, kwargs["streaming"], sorted(kwargs["data_files"])))
        return real(builder, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    monkeypatch.setattr(sources, "_hub_files", lambda source: {
        "train": [str(folder / "data" / "train-00000-of-00001.parquet")],
        "test": [str(folder / "data" / "test-00000-of-00001.parquet")]})
    drawn = parse("hf:someone/tiny-captions:test", allowed_datasets=("someone/tiny-captions",)).draw(3)
    assert drawn.record["kind"] == "hub" and drawn.record["id"] == "hf:someone/tiny-captions"
    assert [e.answer for e in drawn.examples] == captions[8:11]
    local = parse(f"{folder}:test").draw(3)
    assert local.report()["sha256"] == drawn.report()["sha256"]
    assert calls == [("parquet", True, ["test"])] * 2


def bad(message: str, make):
    with pytest.raises(SourceError) as caught:
        make()
    assert message in str(caught.value), str(caught.value)
    assert "/tmp" not in str(caught.value) and "Traceback" not in str(caught.value)
    return str(caught.value)


def test_each_bad_source_gets_its_own_message(tmp_path, monkeypatch):
    images, captions = rows(3)
    no_image = tmp_path / "no-image"
    no_image.mkdir()
    datasets.Dataset.from_dict({"caption": captions}).to_parquet(str(no_image / "train.parquet"))
    bad("has no image column (its columns: caption)", lambda: parse(str(no_image)).draw(1))

    good = tmp_path / "good"
    good.mkdir()
    table(images, captions, id=[1, 2, 3]).to_parquet(str(good / "train.parquet"))
    bad("column 'caption' of good holds string, not images", lambda: parse(str(good), image_column="caption").draw(1))
    bad("column 'id' of good holds int64, not text", lambda: parse(str(good), text_column="id").draw(1))
    bad("good has no split 'test' (it has: train)", lambda: parse(f"{good}:test").draw(1))
    bad("good: 3 usable examples, but 5 calibration samples", lambda: parse(str(good)).draw(5))

    empty = tmp_path / "empty"
    empty.mkdir()
    table([], []).to_parquet(str(empty / "train.parquet"))
    bad("split 'train' of empty has no rows", lambda: parse(str(empty)).draw(1))

    bad("row 1 of good: the image is 32 x 32 pixels; the limit is 1,000 pixels",
        lambda: parse(str(good), max_pixels=1000).draw(1))

    script = tmp_path / "scripted"
    script.mkdir()
    (script / "scripted.py").write_text("raise SystemExit('dataset code ran')\n")
    table(images, captions).to_parquet(str(script / "train.parquet"))
    bad("comes with a loading script (scripted.py): dataset code is never run", lambda: parse(str(script)))

    bad("this deployment takes calibration data from these hub datasets only: hf:lmms-lab/flickr30k",
        lambda: parse("hf:someone/else", allowed_datasets=("lmms-lab/flickr30k",)))
    bad("this deployment takes no calibration data from the hub", lambda: parse("hf:a/b", allowed_datasets=()))
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    bad("the Hugging Face hub cannot be reached from here, so hf:lmms-lab/flickr30k cannot be read",
        lambda: parse("hf:lmms-lab/flickr30k:test").draw(4))
    bad("a hub dataset is written hf:OWNER/NAME", lambda: parse("hf:../../etc"))
    bad("no calibration folder or file named 'missing'", lambda: parse(str(tmp_path / "missing")))
    bad("at most 1024 examples", lambda: parse(None).draw(1000, held_out=100))


def test_a_hub_dataset_with_a_loading_script_is_refused_before_any_data(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, repo_type: ["flickr.py", "README.md"])
    bad("hf:old/flickr comes with a loading script (flickr.py): dataset code is never run",
        lambda: parse("hf:old/flickr").draw(2))


def test_images_folder_is_labelled_by_the_full_model(tmp_path):
    loaded = tiny_model("opt")
    images, _ = rows(5)
    folder = tmp_path / "mine"
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    source = parse(str(folder), question="what color is the circle?")
    assert source.kind == "images"
    drawn = source.draw(3, held_out=2, labeller=sources.labeller(lambda im, q: ask(loaded, im, q), batch_size=2))
    expected = ask(loaded, images, ["what color is the circle?"] * 5, 20)
    assert [e.answer for e in drawn.examples + drawn.held_out] == expected
    assert drawn.record["targets"] == "generated by the full model"
    assert drawn.record["question"] == "what color is the circle?"
    assert any("full model's own answers" in w for w in drawn.warnings)
    bad("need the full model to label them", lambda: source.draw(2))


def test_caption_recipe_matches_blip_processing_and_is_seeded():
    assert caption_text("A Dog, (running) on the Beach!  ") == "a dog, running on the beach"
    assert caption_text(" ".join(["w"] * 60)) == " ".join(["w"] * 50)
    images, _ = rows(20)
    examples = [Example(image, "", "Red circle; and BLUE square: two.") for image in images]
    one, two = prefix_lm(examples, seed=3), prefix_lm(examples, seed=3)
    assert [e.target_from for e in one] == [e.target_from for e in two]
    text = "red circle and blue square two"
    assert all(e.answer == text and 1 <= e.target_from <= len(text) // 2 for e in one)
    assert len({e.target_from for e in one}) > 3
    assert examples_for("prefix_lm", examples, 3) is examples_for("prefix_lm", examples, 3)


def test_prefix_tokens_are_given_not_scored(family):
    """Word-level shapes tokenizer: a cut after 'red green' (9 characters) gives exactly those two tokens."""
    loaded = tiny_model(family)
    image = rows(1)[0][0]
    full = encode_examples(loaded, [Example(image, "", "red green circle")])
    cut = encode_examples(loaded, [Example(image, "", "red green circle", target_from=10)])
    scored_full, scored_cut = full["labels"][0] != IGNORE, cut["labels"][0] != IGNORE
    assert int(scored_full.sum()) - int(scored_cut.sum()) == 2
    first = scored_full.nonzero().flatten()[:2]
    assert not scored_cut[first].any()
    assert torch.equal(full["labels"][0][scored_cut], cut["labels"][0][scored_cut])
    assert torch.equal(full["input_ids"], cut["input_ids"])
    if family == "t5":  # the decoder reads the whole caption, prefix included
        shifted = loaded.model.language_model._shift_right(full["labels"])
        assert torch.equal(cut["decoder_input_ids"], shifted)


def test_report_records_source_count_hash_loss_and_warnings(parquet_folder, family):
    folder, images, captions = parquet_folder
    loaded = tiny_model(family)
    drawn = parse(str(folder)).draw(8)
    result = prune(loaded, "ecoflap_zeroth", 0.5, PruneOptions(samples=6, stage1_samples=4, loss="prefix_lm"), drawn)
    assert result.calibration == {"kind": "dataset", "id": "tiny-captions", "split": "train",
                                  "columns": {"image": "image", "text": "caption"}, "count": 6, "loss": "prefix_lm",
                                  "targets": "the source's own text",
                                  "sha256": independent_digest(images[:6], [""] * 6, captions[:6])}
    assert result.options["loss"] == "prefix_lm" and result.warnings == []
    assert prune(loaded, "magnitude", 0.5).calibration is None


def test_shapes_set_for_a_real_model_is_said_out_loud():
    from tiny_families import tiny_llava

    result = prune(tiny_llava(), "wanda", 0.5, PruneOptions(samples=4))
    assert result.calibration["kind"] == "shapes"
    assert result.warnings == [sources.SYNTHETIC]
    assert prune(tiny_model("opt"), "wanda", 0.5, PruneOptions(samples=4)).warnings == []


def test_deployment_default_is_for_real_models_only():
    from tiny_families import tiny_llava

    environ = {"ECOFLAP_CALIBRATION": "hf:lmms-lab/flickr30k:test"}
    assert sources.deployment_default(tiny_llava(), environ) == "hf:lmms-lab/flickr30k:test"
    assert sources.deployment_default(tiny_model("opt"), environ) is None
    assert sources.deployment_default(tiny_llava(), {}) is None


def test_cli_prunes_on_each_source_kind(saved_model, parquet_folder, saved_folder, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = parquet_folder[0]
    images = tmp_path / "pictures"
    images.mkdir()
    for i, image in enumerate(rows(8)[0]):
        image.save(images / f"{i}.png")
    for spec, kind, extra in [(str(folder), "dataset", ["--loss", "prefix_lm"]),
                              (f"{saved_folder[0]}:validation", "dataset", []),
                              (str(images), "images", ["--question", "how many shapes are there?"])]:
        report = tmp_path / f"{kind}.json"
        done = run("prune", "--model", str(saved_model), "--method", "wanda", "--calibration", spec,
                   "--samples", "4", "--report", str(report), *extra)
        assert done.returncode == 0, done.stderr
        entry = json.loads(report.read_text())["calibration"]
        assert entry["kind"] == kind and entry["count"] == 4
        assert entry["loss"] == ("prefix_lm" if extra[:1] == ["--loss"] else "answer")
        if kind == "images":
            assert "full model's own answers" in done.stderr and entry["targets"] == "generated by the full model"
    done = run("prune", "--model", str(saved_model), "--calibration", "hf:a/b", "--samples", "4")
    assert done.returncode == 2 and "cannot be reached" in done.stderr and "Traceback" not in done.stderr


def test_open_image_bound_reads_only_the_header():
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buffer, "PNG")
    buffer.seek(0)
    with pytest.raises(ValueError, match="300 x 200 pixels; the limit is 10,000"):
        from ecoflap.images import open_image

        open_image(buffer, 10_000)


# the deployment: what a person may name, their own images, the default for real models, curves

@pytest.fixture
def deployment_data(tmp_path):
    images, captions = rows(6)
    data = tmp_path / "data"
    for name in ("good", "noimage", "scripted", "empty"):
        (data / name).mkdir(parents=True)
    table(images, captions).to_parquet(str(data / "good" / "train.parquet"))
    datasets.Dataset.from_dict({"caption": captions}).to_parquet(str(data / "noimage" / "train.parquet"))
    table(images, captions).to_parquet(str(data / "scripted" / "train.parquet"))
    (data / "scripted" / "scripted.py").write_text("raise SystemExit('dataset code ran')\n")
    table([], []).to_parquet(str(data / "empty" / "train.parquet"))
    return data


@pytest.mark.parametrize("spec, message", [
    ("local:noimage", "noimage has no image column"),
    ("local:empty", "split 'train' of empty has no rows"),
    ("local:good:test", "good has no split 'test' (it has: train)"),
    ("local:scripted", "comes with a loading script"),
    ("local:other", "no calibration set named 'other' (it has: empty, good, noimage, scripted)"),
    ("hf:someone/else", "from these hub datasets only: hf:lmms-lab/flickr30k"),
    ("hf:lmms-lab/flickr30k:test", "the Hugging Face hub cannot be reached"),
    ("/etc", "never from a path on the server"),
    ("../data/good", "never from a path on the server"),
])
def test_bad_sources_leave_the_session_model_and_runs_intact(tmp_path, deployment_data, spec, message, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    server = make_server(saved(tiny_model("opt"), tmp_path / "tiny-opt"), tmp_path, local_data=str(deployment_data),
                        allowed_datasets=("lmms-lab/flickr30k",))
    me = server.open_session()
    kept = me.prune("wanda", 0.5, calibration="local:good", samples=4)
    assert kept.result.calibration["id"] == "good" and kept.result.calibration["count"] == 4
    with pytest.raises(ValueError) as caught:
        me.prune("wanda", 0.5, calibration=spec, samples=4)
    assert message in str(caught.value) and str(tmp_path) not in str(caught.value)
    assert [r.id for r in me.runs()] == [kept.id]
    assert me.restore()


def test_own_uploads_are_labelled_by_the_full_model_and_bounded(tmp_path):
    from ecoflap.images import MAX_IMAGE_PIXELS

    server = make_server(saved(tiny_model("opt"), tmp_path / "tiny-opt"), tmp_path)
    me = server.open_session()
    paths = []
    for i, image in enumerate(rows(3)[0]):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    run = me.prune("ecoflap_zeroth", 0.5, calibration_images=paths, calibration_question="how many shapes are there?")
    entry = run.result.calibration
    assert entry["kind"] == "images" and entry["count"] == 3 and entry["targets"] == "generated by the full model"
    assert run.result.options["samples"] == 3 and run.result.options["stage1_samples"] == 3
    expected = ask(server.models.get(server.default_model).loaded, [Image.open(p) for p in paths],
                   ["how many shapes are there?"] * 3)
    assert entry["sha256"] == independent_digest([Image.open(p) for p in paths], ["how many shapes are there?"] * 3,
                                                 expected)
    assert any("full model's own answers" in w for w in run.result.warnings)
    Image.new("RGB", (9000, 8000)).save(tmp_path / "huge.png")
    assert 9000 * 8000 > MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="image 1 of 1 uploaded image.s.: the image is 9000 x 8000 pixels"):
        me.prune("wanda", 0.5, calibration_images=[str(tmp_path / "huge.png")])
    assert [r.id for r in me.runs()] == [run.id] and me.restore()


def test_a_real_model_gets_the_deployment_default_or_a_warning(tmp_path, deployment_data, monkeypatch):
    from tiny_families import tiny_llava

    folder = saved(tiny_llava(), tmp_path / "tiny-llava")
    plain = make_server(folder, tmp_path).open_session().prune("wanda", 0.5, samples=4)
    assert plain.result.calibration["kind"] == "shapes" and plain.result.warnings == [sources.SYNTHETIC]
    configured = make_server(folder, tmp_path, calibration=str(deployment_data / "good")).open_session()
    run = configured.prune("wanda", 0.5, samples=4)
    assert run.result.calibration["id"] == "good" and run.result.warnings == []
    images, captions = rows(140, size=16)
    (tmp_path / "big").mkdir()
    table(images, captions).to_parquet(str(tmp_path / "big" / "train.parquet"))
    configured = make_server(folder, tmp_path, calibration=str(tmp_path / "big")).open_session()
    bench, measured_on = configured.workbench, []
    reference = bench.reference
    monkeypatch.setattr(bench, "reference", lambda examples, *a, **k: measured_on.append(examples) or
                        reference(examples, *a, **k))
    compared = configured.compare(["wanda", "magnitude"], 0.5, eval_n=10)
    assert [r.result.calibration and r.result.calibration["id"] for r in compared.runs] == ["big", None]
    # the Teach tab measures a real model on the source's held-out rows (after the 128 calibrated on), not cartoons
    assert measured_on and all([e.answer for e in x] == captions[128:138] for x in measured_on)
    assert compared.metric == "mean KL from the full model" and all(r["quality"]["n"] == 10 for r in compared.rows[1:])
    seen = []
    original = bench.prune

    def spy(method, sparsity, options=None, calibration=None, *args, **kwargs):
        seen.append(calibration.record["id"] if calibration is not None else None)
        return original(method, sparsity, options, calibration, *args, **kwargs)

    monkeypatch.setattr(bench, "prune", spy)
    monkeypatch.setattr(ecoflap.sweep, "quick_score", None)  # never the shapes loss of a model that does not speak it
    swept = configured.sweep(["wanda", "magnitude"], [0.5], eval_n=10)
    assert len(swept) == 2 and all(r["metric"] == "mean KL from the full model" and r["score"] == r["kl_mean"] > 0
                                   and "accuracy" not in r for r in swept)
    assert seen == ["big", "big"]  # magnitude reads none of it, but the sweep hands every point the same set
    shapes_model = make_server(saved(tiny_model("opt"), tmp_path / "tiny-opt"), tmp_path,
                              calibration=str(deployment_data / "good"))
    assert shapes_model.open_session().prune("wanda", 0.5, samples=4).result.calibration["kind"] == "shapes"


def test_environment_names_the_deployment_data(tmp_path, deployment_data):
    from ecoflap.serve.server import ConfigError, Limits

    limits = Limits.from_environment({"ECOFLAP_DATASETS": "hf:lmms-lab/flickr30k, a/b",
                                      "ECOFLAP_CALIBRATION": "hf:lmms-lab/flickr30k:test",
                                      "ECOFLAP_LOCAL_DATA": str(deployment_data), "ECOFLAP_CURVES": str(tmp_path)})
    assert limits.allowed_datasets == ("lmms-lab/flickr30k", "a/b")
    assert limits.calibration == "hf:lmms-lab/flickr30k:test" and limits.local_data == str(deployment_data)
    for env, message in [({"ECOFLAP_CALIBRATION": str(tmp_path / "nowhere")}, "ECOFLAP_CALIBRATION: no calibration"),
                         ({"ECOFLAP_LOCAL_DATA": str(tmp_path / "nowhere")}, "ECOFLAP_LOCAL_DATA must be a folder"),
                         ({"ECOFLAP_CURVES": str(tmp_path / "nowhere.json")}, "ECOFLAP_CURVES must be")]:
        with pytest.raises(ConfigError, match=message):
            Limits.from_environment(env)


def test_a_deployment_shows_its_own_precomputed_curves(tmp_path, saved_model, parquet_folder):
    """A sweep's JSON (the CLI's) becomes the Teach tab's curves for the model it measured."""
    curves = tmp_path / "curves"
    curves.mkdir()
    done = run("sweep", "--model", str(saved_model), "--methods", "wanda,magnitude", "--sparsities", "0.3,0.5",
               "--calibration", str(parquet_folder[0]), "--samples", "4", "--eval-n", "10",
               "--json", str(curves / "mine.json"), "--csv", str(tmp_path / "s.csv"), "--html", str(tmp_path / "s.html"))
    assert done.returncode == 0, done.stderr
    written = json.loads((curves / "mine.json").read_text())
    assert written["calibration"]["id"] == "tiny-captions" and "--sparsities 0.3,0.5" in written["command"]
    (curves / "other.json").write_text(json.dumps({**written, "model": "someone-else"}))
    me = make_server(saved_model, tmp_path, curves=str(curves)).open_session()
    shown = me.shipped_curves()
    assert shown["model"] == written["model"] and shown["measured_on"] == written["measured_on"]
    by = {(r["method"], r["sparsity"]): r["score"] for r in shown["rows"]}
    assert by == {(r["method"], r["sparsity"]): r["score"] for r in written["rows"]}
    assert make_server(saved_model, tmp_path).open_session().shipped_curves() is None


def test_self_labelled_table_is_means_over_seeds_of_the_rows():
    from ecoflap.toy.self_labels import table

    rows = [{"method": "ecoflap_zeroth", "sparsity": 0.6, "seed": s, "targets": t, "accuracy": a}
            for s, t, a in [(0, "labelled", 0.94), (0, "self-labelled", 0.93), (1, "labelled", 0.92),
                            (1, "self-labelled", 0.95)]]
    rows += [{"method": "wanda", "sparsity": 0.6, "seed": 0, "targets": "labelled", "accuracy": 0.874},
             {"method": "wanda", "sparsity": 0.6, "seed": 0, "targets": "self-labelled", "accuracy": 0.872},
             {"method": "wanda", "sparsity": 0.7, "seed": 0, "targets": "labelled", "accuracy": 0.5}]
    assert table({"rows": rows}).splitlines()[2:] == [
        "| Wanda | 0.6 | 1 | 87.4% | 87.2% | -0.2 points |",
        "| ECoFLaP (zeroth-order) | 0.6 | 2 | 93.0% (92.0% to 94.0%) | 94.0% (93.0% to 95.0%) | +1.0 points |"]


@pytest.mark.parametrize("name", ["instructblip", "instructblip_t5", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl",
                                  "paligemma", "idefics3", "smolvlm"])
def test_every_family_calibrates_on_a_dataset_with_either_loss(name, parquet_folder):
    """The prefix-LM cut unlabels the whole tokens of each target's prefix (none where the cut
    falls inside the first token) and keeps the rest, whatever the family's prompt and
    tokenizer; the pipeline records the source for every family."""
    from tiny_families import tiny

    loaded = tiny(name)
    drawn = parse(str(parquet_folder[0])).draw(8)
    cut = examples_for("prefix_lm", drawn.examples, seed=0)
    full = encode_examples(loaded, [Example(e.image, e.question, e.answer) for e in cut])
    given = encode_examples(loaded, cut)
    scored_full, scored_cut = (full["labels"] != IGNORE).sum(1), (given["labels"] != IGNORE).sum(1)
    assert bool((scored_cut <= scored_full).all()) and bool((scored_cut < scored_full).any())
    assert bool((scored_cut >= 1).all())
    result = prune(loaded, "wanda", 0.5, PruneOptions(samples=4, loss="prefix_lm", batch_size=2), drawn)
    assert result.calibration["count"] == 4 and result.calibration["loss"] == "prefix_lm"
    assert result.warnings == []
