"""The long measurements of the shipped model resume from their results files through one loader."""

import json
from pathlib import Path

import pytest

from ecoflap.toy import label_free, recovery, self_labels
from ecoflap.toy.resumable import ResumeError, resume

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "shapes-blip2"


def test_a_missing_file_starts_fresh_and_a_written_one_gives_its_keys(tmp_path):
    fresh = resume(tmp_path / "none.json", recovery.key, {"command": "c"})
    assert fresh.data == {"command": "c", "rows": []} and fresh.done == set() and fresh.seconds() == 0
    rows = [{"method": "wanda", "sparsity": 0.7, "seed": 0, "steps": 100, "lr": 2e-5},
            {"method": "wanda", "sparsity": 0.7, "seed": 0, "steps": 100, "lr": 2e-5, "way": "lora"}]
    (tmp_path / "r.json").write_text(json.dumps({"rows": rows, "seconds": 12}))
    again = resume(tmp_path / "r.json", recovery.key)
    assert again.rows == rows and again.seconds() == 12
    assert again.done == {("wanda", 0.7, 0, 100, 2e-5, "full"), ("wanda", 0.7, 0, 100, 2e-5, "lora")}


def test_each_measurement_recognises_its_own_finished_points(tmp_path):
    """The key of a written row equals the key of the point it measured, so nothing is measured twice."""
    points = label_free.points(SHIPPED)
    rows = [{**p, "quality": {}} for p in points[:7]]
    (tmp_path / "lf.json").write_text(json.dumps({"rows": rows}))
    done = resume(tmp_path / "lf.json", label_free.key).done
    assert [label_free.key(p) in done for p in points] == [True] * 7 + [False] * (len(points) - 7)

    rows = [{"method": m, "sparsity": s, "seed": seed, "targets": "labelled", "accuracy": 0.5}
            for m, s, seed in self_labels.POINTS[:3]]
    (tmp_path / "sl.json").write_text(json.dumps({"rows": rows}))
    done = resume(tmp_path / "sl.json", self_labels.key).done
    assert [(m, s, seed, t) in done for m, s, seed in self_labels.POINTS for t in self_labels.LABELS] == \
        [True, False] * 3 + [False, False] * (len(self_labels.POINTS) - 3)


@pytest.mark.slow  # a measurement on the shipped model end to end: prunes, recoveries, scores
def test_a_rerun_keeps_the_finished_rows_and_measures_only_the_rest(tmp_path):
    out = tmp_path / "recovery.json"
    kept = {"method": "wanda", "label": "Wanda", "sparsity": 0.7, "seed": 0, "steps": 1, "lr": 2e-5,
            "before": -1.0, "after": -2.0, "recover_cpu_s": 0}
    out.write_text(json.dumps({"model": "shapes-blip2", "rows": [kept]}))
    data = recovery.measure(str(SHIPPED), out, ["wanda"], [0.7], [1, 2], [0], eval_n=4, log=lambda _: None)
    written = json.loads(out.read_text())
    assert written == data and written["rows"][0] == kept  # not measured again: the sentinel scores stay
    assert [(r["steps"], r["way"]) for r in written["rows"][1:]] == [(2, "full")]
    assert 0 <= written["rows"][1]["after"] <= 1 and written["rows"][1]["zeros_held"]


@pytest.mark.parametrize("text, why", [
    ('{"rows": [{"method": "wanda", "sparsity": 0.7', "not valid JSON (line 1, column 46"),
    ("", "not valid JSON (line 1, column 1"),
    ('[{"method": "wanda"}]', "not a results file"),
    ('{"rows": [{"method": "wanda", "sparsity": "most", "seed": 0, "steps": 1, "lr": 2e-5}]}',
     "row 1 is not a row this measurement writes"),
    ('{"rows": {"method": "wanda"}}', "not a results file"),
    ('{"rows": [{"method": "wanda", "sparsity": 0.7, "seed": 0, "steps": 1, "lr": 2e-5}, {"method": "owl"}]}',
     "row 2 has no 'sparsity', so it cannot tell which point"),
])
def test_a_corrupt_or_partial_file_is_refused_with_its_reason_and_left_as_it_was(tmp_path, capsys, text, why):
    out = tmp_path / "recovery.json"
    out.write_text(text)
    with pytest.raises(ResumeError, match="cannot be resumed") as refused:
        resume(out, recovery.key)
    assert str(out) in str(refused.value) and why in str(refused.value)
    assert "move it away" in str(refused.value)
    with pytest.raises(SystemExit) as stopped:  # the command says the same in one line, before loading anything
        recovery.main(["--out", str(out), "--model", str(tmp_path / "no-model")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert why in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == text
