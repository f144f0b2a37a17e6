"""Where calibration examples come from: one concept for the library, the CLI, the API and the app.

    source = parse("hf:lmms-lab/flickr30k:test")     # or a folder, or None for the shipped set
    drawn = source.draw(128, held_out=64)            # calibration + disjoint held-out examples

A source is one of:
- `shapes`: the shipped set of 128 synthetic image-caption pairs;
- `jsonl`: a folder with `examples.jsonl` ({"image", "question", "answer"} per line);
- `images`: a folder of images without captions, or a person's uploads: the targets are the
  full model's own answers (its captions, or its answers to one question), so any model can
  be calibrated offline; the report says so;
- `dataset`: a folder `datasets` saved (`save_to_disk`) or a folder of parquet files;
- `hub`: `hf:OWNER/NAME[:SPLIT]`, a Hugging Face dataset.

Datasets (the last two) go through one code path: the data files are found by the hub's
own conventions and streamed with `datasets.load_dataset(<parquet|arrow>, data_files=...,
streaming=True)`, so only the rows used are read, and no dataset code is ever run (a
dataset that ships a loading script is refused). Counts and image sizes are bounded; a
deployment names the hub datasets strangers may use. Every refusal is a `SourceError`
with one line for a person, never a server path or an OS error.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .data import DEFAULT_CALIBRATION, Example, default_calibration
from .images import MAX_IMAGE_PIXELS, open_image

MAX_SAMPLES = 1024  # calibration plus held-out examples read from one source
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
HUB = re.compile(r"hf:([A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95})(?::([A-Za-z0-9_.-]{1,64}))?")
TEXT_COLUMNS = ("caption", "captions", "text", "sentence", "sentences", "answer", "answers", "description",
                "alt_text", "txt")
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "picture")
SYNTHETIC = ("calibrated on the shipped synthetic shapes set: this model was not trained on it, so its statistics "
             "and scores say little about the model on real images (pick a dataset, or your own images)")
SELF_LABELLED = "The calibration targets are the full model's own answers ({what}), not labels: pruning keeps " \
                "what the model already says, mistakes included."
# A labeller answers (images, question) with the full model's answers, one per image.
Labeller = Callable[[list, str], list[str]]


class SourceError(ValueError):
    """A calibration source that cannot be used, with one line that says why."""


@dataclass
class Calibration:
    """Examples drawn from a source: the calibration set, a held-out set that never overlaps
    it (for judging the pruned model on the same kind of data), and what to report."""

    examples: list[Example]
    record: dict
    warnings: list[str] = field(default_factory=list)
    held_out: list[Example] = field(default_factory=list)

    def report(self, used: int | None = None) -> dict:
        """The report's `calibration` entry for the first `used` examples (all by default)."""
        used = len(self.examples) if used is None else min(used, len(self.examples))
        return {**self.record, "count": used, "sha256": digest(self.examples[:used])}


@dataclass(frozen=True)
class Source:
    """Where examples come from (see the module docstring for the kinds)."""

    kind: str
    id: str
    location: str = ""
    split: str | None = None
    image_column: str | None = None
    text_column: str | None = None
    question: str = ""
    files: tuple[str, ...] = ()
    max_pixels: int = MAX_IMAGE_PIXELS

    @property
    def self_labelled(self) -> bool:
        return self.kind == "images"

    def draw(self, n: int, held_out: int = 0, labeller: Labeller | None = None) -> Calibration:
        """The first `n` usable examples for calibration and the next `held_out` ones, none
        of them equal to a calibration example. Self-labelled sources need `labeller`."""
        if n < 1 or held_out < 0:
            raise SourceError(f"the number of calibration samples must be at least 1 (got {n})")
        if n + held_out > MAX_SAMPLES:
            raise SourceError(f"at most {MAX_SAMPLES} examples are read from a calibration source "
                              f"({n} for calibration and {held_out} held out were asked for)")
        examples, split, columns = self._read(n + held_out, labeller)
        if len(examples) < n:
            raise SourceError(f"{self.id}: {len(examples)} usable examples, but {n} calibration samples were "
                              f"asked for (ask for fewer)")
        calibration = examples[:n]
        seen = {_example_digest(e) for e in calibration}
        kept = [e for e in examples[n:] if _example_digest(e) not in seen][:held_out]
        record = {"kind": self.kind, "id": self.id, "split": split, "columns": columns,
                  "targets": "generated by the full model" if self.self_labelled else "the source's own text"}
        if self.self_labelled:
            record["question"] = self.question
        warnings = [SELF_LABELLED.format(what=f"answers to {self.question!r}" if self.question else "captions")] \
            if self.self_labelled else []
        return Calibration(calibration, record, warnings, kept)

    def _read(self, count: int, labeller: Labeller | None) -> tuple[list[Example], str | None, dict | None]:
        """(examples in source order, the split read, the columns read)."""
        if self.kind == "shapes":
            return list(default_calibration()[:count]), None, None
        if self.kind == "jsonl":
            return _read_jsonl(Path(self.location), count, self.max_pixels), None, None
        if self.kind == "images":
            if labeller is None:
                raise SourceError("images without captions need the full model to label them (a labeller)")
            paths = self.files or tuple(str(p) for p in _image_files(Path(self.location)))
            if not paths:
                raise SourceError(f"{self.id} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            images = [_open(p, self.max_pixels, f"image {i + 1} of {self.id}") for i, p in enumerate(paths[:count])]
            answers = labeller(images, self.question)
            return [Example(image, self.question, answer) for image, answer in zip(images, answers)], None, None
        stream, split, (image, text) = _open_dataset(self)
        return _read_rows(self, stream, split, image, text, count), split, {"image": image, "text": text}


def parse(spec: str | None, split: str | None = None, image_column: str | None = None,
          text_column: str | None = None, question: str = "", allowed_datasets: tuple[str, ...] | None = None,
          max_pixels: int = MAX_IMAGE_PIXELS) -> Source:
    """A source from its spelling: None, "" or "shapes" (the shipped set), `hf:OWNER/NAME[:SPLIT]`,
    or a path (a folder, a `.jsonl` or `.parquet` file; `PATH:SPLIT` picks a split).

    `allowed_datasets`: the hub datasets this caller may name (None: any, as on one's own
    machine; a deployment passes its ECOFLAP_DATASETS)."""
    common = dict(image_column=image_column or None, text_column=text_column or None,
                  question=(question or "").strip(), max_pixels=max_pixels)
    if spec is None or not str(spec).strip() or str(spec).strip() == "shapes":
        return Source("shapes", "shapes", str(DEFAULT_CALIBRATION))
    spec = str(spec).strip()
    if spec.startswith("hf:"):
        match = HUB.fullmatch(spec)
        if not match:
            raise SourceError("a hub dataset is written hf:OWNER/NAME or hf:OWNER/NAME:SPLIT, "
                              "for example hf:lmms-lab/flickr30k:test")
        repo = match.group(1)
        if allowed_datasets is not None and repo not in allowed_datasets:
            shown = ", ".join(f"hf:{d}" for d in allowed_datasets)
            raise SourceError(f"this deployment takes calibration data from these hub datasets only: {shown}"
                              if allowed_datasets else
                              "this deployment takes no calibration data from the hub (its owner can name "
                              "datasets in ECOFLAP_DATASETS); upload your own images instead")
        return Source("hub", f"hf:{repo}", f"hf://datasets/{repo}", match.group(2) or split, **common)
    path = Path(spec).expanduser()
    if not path.exists() and ":" in spec:
        head, _, tail = spec.rpartition(":")
        if Path(head).expanduser().exists() and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", tail):
            path, split = Path(head).expanduser(), tail
    return local(path, split, **common)


def local(path: Path, split: str | None = None, **common) -> Source:
    """A source in a folder or file on this machine, by what it holds."""
    name = path.name
    if path.is_file():
        if path.suffix == ".jsonl":
            return Source("jsonl", name, str(path), **common)
        if path.suffix in (".parquet", ".arrow"):
            return Source("dataset", name, str(path), split, **common)
        raise SourceError(f"{name}: a calibration file is examples.jsonl or a .parquet file")
    if not path.is_dir():
        raise SourceError(f"no calibration folder or file named {name or str(path)!r}")
    if (path / "examples.jsonl").is_file():
        return Source("jsonl", name, str(path / "examples.jsonl"), **common)
    if _scripts(path):
        raise SourceError(f"{name} comes with a loading script ({_scripts(path)[0]}): dataset code is never run "
                          f"here; use a dataset stored as parquet or arrow files")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file() or _data_files(path):
        return Source("dataset", name, str(path), split, **common)
    if _image_files(path):
        return Source("images", name, str(path), **common)
    raise SourceError(f"{name} holds no calibration data: expected examples.jsonl, a datasets save_to_disk "
                      f"folder, parquet files, or images")


def uploads(paths: list[str], question: str = "", max_pixels: int = MAX_IMAGE_PIXELS) -> Source:
    """A person's own images (already checked to be their uploads), labelled by the full model."""
    if not paths:
        raise SourceError("upload at least one image to calibrate on your own images")
    return Source("images", f"{len(paths)} uploaded image(s)", files=tuple(paths), question=(question or "").strip(),
                  max_pixels=max_pixels)


def given(examples: list[Example], what: str = "examples given in code") -> Calibration:
    """Examples handed over directly (a notebook's list) as a calibration."""
    return Calibration(list(examples), {"kind": "examples", "id": what, "split": None, "columns": None,
                                        "targets": "the source's own text"})


def deployment_default(loaded, environ=None) -> str | None:
    """The deployment's default source (ECOFLAP_CALIBRATION) for a model that does not speak
    the shapes world; None (the shipped set) for one that does, or where none is set."""
    from .scoring import speaks_shapes  # here, not at the top: scoring imports this module

    spec = (os.environ if environ is None else environ).get("ECOFLAP_CALIBRATION", "").strip()
    return spec or None if not speaks_shapes(loaded) else None


def labeller(ask: Callable[[list, list[str]], list[str]], batch_size: int = 8) -> Labeller:
    """A labeller from an ask(images, questions) -> answers of the full model, asked a
    few images at a time (others' questions go between the chunks on a shared model)."""

    def label(images: list, question: str) -> list[str]:
        answers = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            answers.extend(ask(chunk, [question] * len(chunk)))
        return answers

    return label


def calibration_warnings(loaded, drawn: Calibration) -> list[str]:
    """What a person must know about calibrating this model on this data, beyond the
    source's own warnings: the shapes set used for a model that does not speak it."""
    from .scoring import speaks_shapes  # here, not at the top: scoring imports this module

    return [SYNTHETIC] if drawn.record["kind"] == "shapes" and not speaks_shapes(loaded) else []


# reading each kind

def _open(path, max_pixels: int, what: str):
    try:
        return open_image(path, max_pixels)
    except ValueError as err:
        raise SourceError(f"{what}: {err}") from None


def _read_jsonl(index: Path, count: int, max_pixels: int) -> list[Example]:
    examples = []
    with open(index) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image, answer = row["image"], row["answer"]
            except (ValueError, KeyError, TypeError):
                raise SourceError(f"{index.name} line {n}: expected {{\"image\", \"question\", \"answer\"}}") from None
            target = (index.parent / str(image)).resolve()
            if index.parent.resolve() not in target.parents:
                raise SourceError(f"{index.name} line {n}: images must be inside the folder of {index.name}")
            examples.append(Example(_open(target, max_pixels, f"{index.name} line {n}"), row.get("question") or "",
                                    str(answer)))
            if len(examples) >= count:
                break
    return examples


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _scripts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.py"))


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for pattern in ("*.parquet", "*/*.parquet", "*/*/*.parquet") for p in folder.glob(pattern))


def _open_dataset(source: Source):
    """(a streamed split, its name, (image column, text column)) for a dataset or hub source."""
    builder, files, split = _split_files(source)
    import datasets

    try:
        stream = datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=True)
        features = stream.features if stream.features is not None else stream._resolve_features().features
    except Exception as err:  # a broken file or an unreachable hub: one line, never its path
        raise _reading_error(source, err) from None
    columns = _columns(source, features)
    return stream.cast_column(columns[0], datasets.Image(decode=False)), split, columns


def _split_files(source: Source) -> tuple[str, list[str], str]:
    """(builder, the split's data files, split) by the hub's own conventions, for a local
    folder, a save_to_disk folder or a hub repository alike."""
    if source.kind == "hub":
        by_split = _hub_files(source)
    else:
        path = Path(source.location)
        if path.is_file():
            by_split = {"train": [str(path)]}
        elif (path / "dataset_dict.json").is_file():
            names = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            by_split = {s: [str(p) for p in sorted((path / s).glob("*.arrow"))] for s in names}
        elif (path / "state.json").is_file():
            by_split = {"train": [str(p) for p in sorted(path.glob("*.arrow"))]}
        else:
            by_split = _patterns(str(path), source)
    by_split = {s: [f for f in files if f.endswith((".parquet", ".arrow"))] for s, files in by_split.items()}
    by_split = {s: files for s, files in by_split.items() if files}
    if not by_split:
        raise SourceError(f"{source.id} has no parquet or arrow data files")
    split = source.split or ("train" if "train" in by_split else next(iter(by_split)))
    if split not in by_split:
        raise SourceError(f"{source.id} has no split {split!r} (it has: {', '.join(by_split)})")
    files = by_split[split]
    builders = {f.rsplit(".", 1)[1] for f in files}
    if len(builders) > 1:
        raise SourceError(f"{source.id} split {split!r} mixes parquet and arrow files")
    return builders.pop(), files, split


def _patterns(base: str, source: Source) -> dict[str, list[str]]:
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    try:
        patterns = get_data_patterns(base)
        return {str(s): list(files) for s, files in DataFilesDict.from_patterns(patterns, base_path=base).items()}
    except EmptyDatasetError:
        raise SourceError(f"{source.id} has no data files") from None


def _hub_files(source: Source) -> dict[str, list[str]]:
    """The data files of a hub dataset, after checking it is reachable and runs no code."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    repo = source.id.removeprefix("hf:")
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise SourceError(_unreachable(source))
    try:
        top = [f for f in huggingface_hub.list_repo_files(repo, repo_type="dataset") if "/" not in f]
    except GatedRepoError:
        raise SourceError(f"{source.id} is gated on the hub: accept its terms with the server's account, or "
                          f"use another dataset") from None
    except RepositoryNotFoundError:
        raise SourceError(f"no dataset {source.id} on the hub (or it is private)") from None
    except Exception:  # no network, DNS, timeouts, the hub down: the same one line
        raise SourceError(_unreachable(source)) from None
    scripts = [f for f in top if f.endswith(".py")]
    if scripts:
        raise SourceError(f"{source.id} comes with a loading script ({scripts[0]}): dataset code is never run "
                          f"here; pick a dataset stored as parquet (most are, or have a parquet conversion)")
    try:
        return _patterns(source.location, source)
    except SourceError:
        raise
    except Exception:
        raise SourceError(_unreachable(source)) from None


def _unreachable(source: Source) -> str:
    return (f"the Hugging Face hub cannot be reached from here, so {source.id} cannot be read; use a local "
            f"folder (a save_to_disk or parquet copy of it), your own images, or the shipped set")


def _reading_error(source: Source, err: Exception) -> SourceError:
    if isinstance(err, SourceError):
        return err
    if source.kind == "hub" and isinstance(err, (ConnectionError, TimeoutError, OSError)):
        return SourceError(_unreachable(source))
    return SourceError(f"{source.id} could not be read as a dataset ({type(err).__name__})")


def _columns(source: Source, features) -> tuple[str, str]:
    """The image and text columns: the ones named, or found by type and name."""
    import datasets

    names = list(features)
    if source.image_column:
        image = source.image_column
        if image not in features:
            raise SourceError(f"{source.id} has no column {image!r} (it has: {', '.join(names)})")
        if not isinstance(features[image], datasets.Image):
            raise SourceError(f"column {image!r} of {source.id} holds {_kind(features[image])}, not images")
    else:
        found = [c for c in names if isinstance(features[c], datasets.Image)]
        found.sort(key=lambda c: c not in IMAGE_COLUMNS)
        if not found:
            raise SourceError(f"{source.id} has no image column (its columns: {', '.join(names)})")
        image = found[0]
    if source.text_column:
        text = source.text_column
        if text not in features:
            raise SourceError(f"{source.id} has no column {text!r} (it has: {', '.join(names)})")
        if not _is_text(features[text]):
            raise SourceError(f"column {text!r} of {source.id} holds {_kind(features[text])}, not text")
    else:
        found = [c for c in TEXT_COLUMNS if c in features and _is_text(features[c])]
        found = found or [c for c in names if _is_text(features[c])]
        if not found:
            raise SourceError(f"{source.id} has no text column (its columns: {', '.join(names)}); name one, or "
                              f"calibrate on images alone (the full model labels them)")
        text = found[0]
    return image, text


def _is_text(feature) -> bool:
    """A string column, or a list of strings (several captions per image: the first is used)."""
    import datasets

    if isinstance(feature, datasets.Value):
        return feature.dtype in ("string", "large_string")
    inner = getattr(feature, "feature", None)
    return isinstance(feature, (datasets.List, datasets.LargeList)) and inner is not None and _is_text(inner)


def _kind(feature) -> str:
    return getattr(feature, "dtype", None) or type(feature).__name__


def _read_rows(source: Source, stream, split: str, image: str, text: str, count: int) -> list[Example]:
    examples = []
    try:
        for n, row in enumerate(stream, 1):
            examples.append(Example(_row_image(source, row[image], n), "", _row_text(row[text])))
            if len(examples) >= count:
                break
    except SourceError:
        raise
    except Exception as err:
        raise _reading_error(source, err) from None
    if not examples:
        raise SourceError(f"split {split!r} of {source.id} has no rows")
    return examples


def _row_image(source: Source, value, n: int):
    what = f"row {n} of {source.id}"
    data = value.get("bytes") if isinstance(value, dict) else None
    if not data:
        raise SourceError(f"{what}: the image is stored as a file name, not as image bytes; only datasets that "
                          f"carry their images can be used")
    return _open(io.BytesIO(data), source.max_pixels, what)


def _row_text(value) -> str:
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if isinstance(v, str) and v.strip()), "")
    return (value or "").strip()


# identity of what was used

def _example_digest(example: Example) -> bytes:
    h = hashlib.sha256()
    h.update(f"{example.image.mode} {example.image.size}".encode())
    h.update(example.image.tobytes())
    h.update(b"\0" + example.question.encode() + b"\0" + example.answer.encode())
    return h.digest()


def digest(examples: list[Example]) -> str:
    """A SHA-256 over the examples (pixels, size, question and target of each, in order)."""
    h = hashlib.sha256()
    for example in examples:
        h.update(_example_digest(example))
    return h.hexdigest()


# drawn sets are kept, so a person pruning again on the same data neither reads it again
# nor loses the encoding cache (which is keyed by the examples' identity)
DRAWS_KEPT = 4
_draws: OrderedDict[tuple, Calibration] = OrderedDict()
_draws_lock = threading.Lock()


def draw_kept(source: Source, n: int, held_out: int = 0, labeller: Labeller | None = None,
              labelled_by: object = None) -> Calibration:
    """`source.draw`, kept for the last few (source, counts, labelling model) asked for."""
    key = (source, n, held_out, id(labelled_by) if source.self_labelled else None, _stamp(source))
    with _draws_lock:
        hit = _draws.get(key)
        if hit is not None:
            _draws.move_to_end(key)
            return hit
    drawn = source.draw(n, held_out, labeller)
    with _draws_lock:
        _draws[key] = drawn
        while len(_draws) > DRAWS_KEPT:
            _draws.popitem(last=False)
    return drawn


def _stamp(source: Source):
    """Local files' modification times, so an edited folder is read again."""
    paths = source.files or ((source.location,) if source.kind not in ("hub", "shapes") else ())
    try:
        return tuple(os.stat(p).st_mtime_ns for p in paths)
    except OSError:
        return None
