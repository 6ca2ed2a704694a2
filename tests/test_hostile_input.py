"""Hostile but ordinary input: crafted experiment folders, corrupt records, bad CLI arguments.
Each is a clear error naming the file or argument (exit 2), never a traceback or executed code."""

import json
import time

import pandas as pd
import pytest

from ranksearch.orchestrator.cli import main
from ranksearch.orchestrator.plan import build_plan
from ranksearch.orchestrator.records import ExperimentFiles
from ranksearch.search_spaces import load_spec


def finished_experiment(path, tiny_spec, n=3):
    """An experiment folder as a finished search leaves it: spec.json and n ok records."""
    spec = load_spec(tiny_spec(search={"seeds": list(range(n))}))
    plan = build_plan(spec, str(path))
    files = ExperimentFiles(str(path))
    files.write_spec(spec.to_dict())
    for i, slot in enumerate(plan.slots):
        files.write_record(plan.base_record(slot, {}) | {"status": "ok", "error": None, "accuracy": 0.5 + i / 10,
                                                         "params": 100 + i, "dense_params": 1000,
                                                         "compression": 1000 / (100 + i)})
    return plan


def test_report_names_corrupt_records_and_reports_the_rest(tmp_path, tiny_spec, capsys):
    plan = finished_experiment(tmp_path / "exp", tiny_spec)
    records = tmp_path / "exp" / "records"
    truncated, listed, ok = (slot.key for slot in plan.slots)
    (records / f"{truncated}.json").write_text('{"trial_id": "' + truncated)
    (records / f"{listed}.json").write_text("[1, 2]")
    assert main(["report", str(tmp_path / "exp")]) == 0
    err = capsys.readouterr().err
    assert f"{truncated}.json: not valid JSON" in err and f"{listed}.json: expected a JSON object, got list" in err
    trials = pd.read_parquet(tmp_path / "exp" / "report" / "trials.parquet")
    assert trials.trial_id.tolist() == [ok]


def test_a_corrupt_spec_json_is_named(tmp_path, tiny_spec, capsys):
    finished_experiment(tmp_path / "exp", tiny_spec)
    (tmp_path / "exp" / "spec.json").write_text('{"name": ')
    for command in ("report", "resume"):
        assert main([command, str(tmp_path / "exp")]) == 2
        assert "spec.json: not valid JSON" in capsys.readouterr().err
    (tmp_path / "exp" / "spec.json").write_text(json.dumps({"name": "x", "models": ["nope"]}))
    assert main(["resume", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert "spec.json" in err and "models[0]: expected one of" in err


def test_records_with_wrong_fields_are_unreadable_not_crashes(tmp_path, tiny_spec):
    plan = finished_experiment(tmp_path / "exp", tiny_spec)
    files = ExperimentFiles(str(tmp_path / "exp"))
    a, b, c = (slot.key for slot in plan.slots)
    good = files.get_record(a)
    files.write_record(good | {"trial_id": b, "accuracy": "high"})
    files.write_record(good | {"trial_id": c, "params": -3})
    records, bad = files.scan()
    assert [r["trial_id"] for r in records] == [a]
    assert "accuracy: expected a number, got 'high'" in bad[b] and "params: expected a non-negative" in bad[c]
    (tmp_path / "exp" / "records" / f"{a}.json").write_text(json.dumps(good | {"trial_id": "other"}))
    assert "does not match its file name" in files.read_record(a)[1]


def billion_laughs() -> str:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"{c}: &{c} [{', '.join(['*' + p] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    return "models:\n" + "\n".join(f"  {line}" for line in lines) + "\n"


HOSTILE_SPECS = {  # name -> (file content, what the error says)
    "billion laughs": (billion_laughs(), "expands to more than 100,000 values"),
    "deep nesting": ("models: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested deeper than 32 levels"),
    "huge file": ("name: big\n" + "".join(f"k{i}: {i}\n" for i in range(40_000)), "a spec may be at most 262,144"),
    "not utf-8": (b"name: caf\xe9\nmodels: [mlp]\n", "not UTF-8 text (byte 0xe9 at offset 9)"),
    "a billion trials": (None, "the spec expands to 1,000,000,000 trials"),
    "a long value": (None, "... (200,002 characters)"),
}


@pytest.mark.parametrize("name", HOSTILE_SPECS)
def test_hostile_specs_are_refused_quickly_and_briefly(tmp_path, tiny_spec, capsys, name):
    content, expected = HOSTILE_SPECS[name]
    if name == "a billion trials":
        content = json.dumps(tiny_spec(train={"lr": {"loguniform": [1e-3, 1e-2]}},
                                       search={"samples_per_cell": 1_000_000_000}))
    elif name == "a long value":
        content = json.dumps(tiny_spec(models=["x" * 200_000]))
    path = tmp_path / "spec.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    start = time.perf_counter()
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - start < 5, "bounded input must be refused in moments"
    assert expected in err and str(path) in err, err
    assert len(err) < 2_000 and "Traceback" not in err
