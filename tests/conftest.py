"""Tiny BLIP-2s built from configs (OPT and T5) and random calibration data: no network."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ecoflap.data import Example, batches
from ecoflap.models import LoadedModel
from ecoflap.synthetic import build_blip2, build_processor, small_blip2_config
from ecoflap.shapes.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "assets" / "examples" / "scene1.png"
FAST = {"samples": 32, "stage1_samples": 8}
WORDS = "red green blue yellow circle square triangle one two three yes no".split()
QUESTIONS = ["", "what color is the circle?", "how many shapes are there?", "is there a red square?"]


def tiny_model(family: str, seed: int = 0, smooth: bool = False, **config) -> LoadedModel:
    """`smooth`: GELU instead of OPT's ReLU, for tests of derivatives (no kinks)."""
    tokenizer = build_tokenizer(family)
    config = small_blip2_config(tokenizer, family, **config)
    if smooth and family == "opt":
        config.text_config.activation_function = "gelu"
    model = build_blip2(config, seed=seed)
    return LoadedModel(model, build_processor(tokenizer, config), f"tiny-{family}", torch.device("cpu"), torch.float32)


def random_examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    state = np.random.RandomState(seed)
    examples = []
    for _ in range(n):
        size = rng.randint(24, 64)
        image = Image.fromarray((state.rand(size, size, 3) * 255).astype("uint8"))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))
        examples.append(Example(image, rng.choice(QUESTIONS), answer))
    return examples


@pytest.fixture(params=["opt", "t5"])
def family(request):
    return request.param


@pytest.fixture
def loaded(family):
    return tiny_model(family)


@pytest.fixture(scope="session")
def examples():
    return random_examples(32)


@pytest.fixture
def calibration_folder(tmp_path, examples):
    folder = tmp_path / "calibration"
    folder.mkdir()
    with open(folder / "examples.jsonl", "w") as f:
        for i, ex in enumerate(examples):
            ex.image.save(folder / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "question": ex.question, "answer": ex.answer}) + "\n")
    return folder


def saved(loaded: LoadedModel, folder: Path) -> Path:
    """A `save_pretrained` folder of a model and its processor."""
    loaded.model.save_pretrained(folder)
    loaded.processor.save_pretrained(folder)
    return folder


@pytest.fixture
def saved_model(tmp_path, family):
    return saved(tiny_model(family), tmp_path / f"tiny-{family}")


@pytest.fixture
def model_folder(tmp_path):
    """A tiny OPT BLIP-2 saved to a folder: the model of a deployment's tests."""
    return saved(tiny_model("opt"), tmp_path / "tiny-opt")


@pytest.fixture(scope="module")
def shared_model_folder(tmp_path_factory):
    """A tiny OPT BLIP-2 saved once for a whole test module, for deployments that only read it."""
    return saved(tiny_model("opt"), tmp_path_factory.mktemp("shared") / "tiny-opt")


@pytest.fixture(scope="module")
def few_quality_questions():
    """Every run measured against the full model on 10 held-out questions instead of 100 (the
    hundred answers it generates are nearly all of a tiny model's prune): for the deployment's
    tests, which check who holds what and what is refused, not how good a run is."""
    from ecoflap.serve import session

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(session, "QUALITY_N", 10)
        yield


def make_server(folder, tmp_path, **limits):
    """A deployment of the model in `folder` on the CPU, with `limits` and its exports under tmp_path."""
    from ecoflap.serve.server import Limits, Server

    return Server(str(folder), device="cpu", limits=Limits(**limits), export_root=tmp_path / "exports")


SLOW_FIXTURES = {"app", "strict_app", "browser"}  # each starts the app in its own process, or a browser
SLOW_FILES = {"test_browser.py"}


def pytest_collection_modifyitems(config, items):
    """Mark slow what starts a server, a browser, a subprocess CLI or the soak, so that
    `pytest -m "not slow"` is the everyday lane (CI still runs everything)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


STATS_KEY = "owner-key-for-tests"  # the apps the tests start read /stats with it


def wait_for(condition, timeout: float = 120, what: str = "the condition"):
    """Poll until `condition()` holds; fail after `timeout` seconds instead of hanging the suite."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        time.sleep(0.02)


def wait_for_progress(job, timeout: float = 120):
    """Until a job submitted through gradio_client reports progress; a job that ended first
    (refused, say) fails the test with its own error."""
    wait_for(lambda: job.status().code.name == "PROGRESS" or job.done(), timeout, "the job to report progress")
    if job.done():
        job.result()
        raise AssertionError("the job finished before it reported any progress")


def when_running(url: str, timeout: float = 120):
    """Until the app holds a running job (its /stats, read with the owner's key): a page's
    progress shows while the job still waits for its worker thread, and a Stop pressed then
    finds nothing to stop."""
    owner = client(url)
    wait_for(lambda: owner.predict(STATS_KEY, api_name="/stats")["jobs_running"] > 0, timeout,
             "the job to run on the server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path_factory, **env_extra):
    """The app in its own process on 127.0.0.1 (a fresh gradio temp folder), and its log."""
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), **env_extra)
    env.pop("ECOFLAP_MODEL", None)
    env.setdefault("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio-uploads")))
    env.setdefault("ECOFLAP_STATS_TOKEN", STATS_KEY)
    uploads = Path(env["GRADIO_TEMP_DIR"])
    log = tmp_path_factory.mktemp("app") / "app.log"
    model = ["--model", os.environ["ECOFLAP_TEST_MODEL"]] if os.environ.get("ECOFLAP_TEST_MODEL") else []
    process = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), *model],
                               cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app exited early:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        raise RuntimeError(f"app did not start:\n{log.read_text()}")
    return process, url, log, uploads


# Every test reaches the shared app from 127.0.0.1, as if a whole class sat behind one
# address: the per-person bounds (tested on their own apps in test_attacks) are set wide.
MANY_PEOPLE_ON_ONE_ADDRESS = dict(ECOFLAP_MAX_SESSIONS="2000", ECOFLAP_MAX_SESSIONS_PER_CLIENT="1000", ECOFLAP_MAX_JOBS_PER_CLIENT="64",
                                  ECOFLAP_MAX_UPLOADS_PER_CLIENT="10000", ECOFLAP_MAX_UPLOAD_CLIENT_MB="1024",
                                  ECOFLAP_MAX_QUEUED_PER_CLIENT="1000")


@pytest.fixture(scope="session")
def app(tmp_path_factory):
    """The app on 127.0.0.1 with the embedded model, shared by the API and browser tests."""
    process, url, log, uploads = launch(tmp_path_factory, **MANY_PEOPLE_ON_ONE_ADDRESS)
    APP_FILES["uploads"], APP_FILES["log"] = uploads, log
    yield url
    process.terminate()
    process.wait(timeout=30)


APP_FILES: dict = {}


@pytest.fixture(scope="session")
def strict_app(tmp_path_factory):
    """The app with tight limits: 2 runs per session, 3 sweep points, 1 MB uploads, no model export."""
    process, url, log, _uploads = launch(tmp_path_factory, ECOFLAP_MAX_RUNS="2", ECOFLAP_MAX_SWEEP_POINTS="3",
                               ECOFLAP_MAX_UPLOAD_MB="1", ECOFLAP_ALLOW_MODEL_EXPORT="0")
    yield url, log
    process.terminate()
    process.wait(timeout=30)

def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def prune(c, method, sparsity, **extra):
    options = {**FAST, **extra}
    return c.predict(method, sparsity, api_name="/prune", **options)


def choose_method(page, name: str):
    """Choose a method on the Prune tab as a person does: its allocation, then its stage 2,
    then (ECoFLaP) its scores; after each click, wait until the page names the method made."""
    from ecoflap.methods import METHODS, compose

    def checked(group):
        box = page.locator(f"#{group} input:checked")
        return box.get_attribute("value") if box.count() else None

    def named(label):
        page.wait_for_function("label => { const e = document.querySelector('#prune-method-name'); "
                               "return e && e.innerText.trim().split(' = ')[0] === 'Method: ' + label; }",
                               arg=label, timeout=30_000)

    method = METHODS[name]
    for group, value in [("prune-allocation", method.allocation), ("prune-stage2", method.stage2),
                         ("prune-variant", method.name)]:
        if checked(group) in (value, None):
            continue  # already chosen, or not asked for this allocation
        before = {"allocation": checked("prune-allocation"), "stage2": checked("prune-stage2"),
                  "variant": checked("prune-variant")}
        before[group.removeprefix("prune-")] = value
        page.locator(f"#{group} input[value='{value}']").check()
        named(compose(**before).label)
    named(method.label)


def inputs_alone(loaded, layers, examples):
    """Sum of squares, X^T X and row count of each layer's inputs, one example at a time."""
    sums = {layer.name: [torch.zeros(layer.module.in_features, dtype=torch.float64),
                     torch.zeros(layer.module.in_features, layer.module.in_features, dtype=torch.float64), 0]
            for layer in layers}

    def hook_for(name):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name][0] += (x * x).sum(0)
            sums[name][1] += x.t() @ x
            sums[name][2] += x.shape[0]
        return hook

    handles = [layer.module.register_forward_pre_hook(hook_for(layer.name)) for layer in layers]
    try:
        with torch.no_grad():
            for example in examples:
                loaded.model(**batches(loaded, [example], 1)[0])
    finally:
        for h in handles:
            h.remove()
    return sums


def assert_replay_sees_inputs_alone(loaded, examples, batch_size: int, scaled: bool = False):
    """Block by block over padded batches, every prunable layer's input statistics are those
    of plain forward passes over each example alone: the same rows, sums of squares and
    X^T X (float32 sums against float64; `scaled`: the tolerance relative to the largest
    sum of squares, for wider models)."""
    from ecoflap.anatomy import INCLUDE_CHOICES, prunable_layers
    from ecoflap.replay import BlockReplay

    layers = prunable_layers(loaded.model, INCLUDE_CHOICES)
    seen = {}
    for block in BlockReplay(loaded.model, batches(loaded, examples, batch_size)).blocks(layers):
        seen.update(block.input_statistics(hessian=True))
    reference = inputs_alone(loaded, layers, examples)
    assert set(seen) == {layer.name for layer in layers}
    for name, (sq, hessian, rows) in reference.items():
        stats = seen[name]
        scale = float(sq.max()) if scaled else 1.0
        assert stats.tokens == rows, name
        assert torch.allclose(stats.sq_norm.double(), sq, rtol=1e-4, atol=1e-6 * scale), name
        assert torch.allclose(stats.hessian.double(), hessian, rtol=1e-4, atol=1e-5 * scale), name


def masks_at_batch_sizes(loaded, method, batch_sizes, examples, samples):
    """The zero masks of one prune per calibration batch size, the full weights back between."""
    from ecoflap.options import PruneOptions
    from ecoflap.pipeline import prune
    from ecoflap.weights import WeightStore

    store = WeightStore.of(loaded)
    masks = []
    for batch_size in batch_sizes:
        result = prune(loaded, method, 0.5, PruneOptions(samples=samples, batch_size=batch_size), examples)
        masks.append({r["name"]: loaded.model.get_submodule(r["name"]).weight == 0 for r in result.layers})
        store.restore()
    return masks
