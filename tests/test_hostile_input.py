"""Hostile but ordinary input: crafted experiment folders, corrupt records, bad CLI arguments.
Each is a clear error naming the file or argument (exit 2), never a traceback or executed code."""

import contextlib
import json
import struct
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


CLI_CASES = {  # argv -> what the error names
    "criteo on an image model": (["train", "--dataset", "criteo:F"], "--dataset: 'criteo:F' does not fit model 'mlp'"),
    "dlrm on digits": (["train", "--model", "dlrm"], "--dataset: 'digits' does not fit model 'dlrm'"),
    "lr inf": (["train", "--lr", "inf"], "--lr: expected a positive number, got inf"),
    "param type": (["train", "--method", "bayesian", "--param", "kl_weight=abc"], "--param kl_weight: expected a number"),
    "param of fixed": (["train", "--param", "lam=1"], "--param lam: unknown hyperparameter"),
    "dataset option": (["train", "--dataset-option", "foo=1"], "--dataset-option foo: not an option of 'digits'"),
    "model option": (["train", "--model-option", "foo=1"], "--model-option foo: not an option of model 'mlp'"),
    "device": (["train", "--device", "foo"], "--device: expected auto, cpu"),
    "shape not a list": (["train", "--shape", '1={"in_shape": [8, "x"]}'], "--shape 1.in_shape: expected a list of positive integers"),
    "shape key": (["train", "--shape", '1={"in_shapes": [8, 8]}'], "--shape 1.in_shapes: unknown key"),
    "shape of no layer": (["train", "--shape", '2={"in_shape": [8, 8]}'], "shapes.2: not a layer this run factorizes; those are: 1, 3"),
    "shape too small": (["train", "--shape", '1={"in_shape": [4, 4]}'], "shapes.1.in_shape: the product of [4, 4] is 16, smaller than 64"),
    "max-train 0": (["train", "--max-train", "0"], "argument --max-train: expected an integer >= 1"),
    "epochs 0": (["train", "--epochs", "0"], "argument --epochs: expected an integer >= 1"),
    "finetune -1": (["train", "--finetune-epochs", "-1"], "argument --finetune-epochs: expected an integer >= 0"),
    "budget 1.5": (["train", "--budget", "1.5"], "--budget: 1.5 is outside (0, 1]; an integer >= 2"),
    "json folder missing": (["train", "--json", "/nonexistent/x.json"], "--json: the folder /nonexistent does not exist"),
    "save to a folder": (["train", "--save", "{tmp}/"], "--save: {tmp}/ is a directory"),
    "storage is a file": (["run", "digits-quick", "--storage", "{tmp}/file"], "--storage: {tmp}/file is a file"),
    "name escapes": (["run", "digits-quick", "--storage", "{tmp}", "--name", "../../escaped"], "--name: expected letters"),
    "no job server": (["submit", "digits-quick", "--address", "127.0.0.1:1"], "--address: cannot reach the Ray job server at 127.0.0.1:1"),
    "missing data": (["validate", "{tmp}/mnist.yaml"], "dataset: '{tmp}/nowhere' does not exist"),
    "unknown option": (["validate", "{tmp}/options.yaml"], "dataset_options.foo: not an option of 'digits'"),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_errors_exit_2_naming_the_argument_before_anything_runs(tmp_path, tiny_spec, capsys, case):
    argv, expected = CLI_CASES[case]
    tmp = str(tmp_path)
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "mnist.yaml").write_text(json.dumps(tiny_spec(dataset=f"mnist:{tmp}/nowhere")))
    (tmp_path / "options.yaml").write_text(json.dumps(tiny_spec(dataset_options={"foo": 1})))
    start = time.perf_counter()
    with pytest.raises(SystemExit) if expected.startswith("argument") else contextlib.nullcontext() as exit_code:
        assert main([a.replace("{tmp}", tmp) for a in argv]) == 2
    if expected.startswith("argument"):
        assert exit_code.value.code == 2
    err = capsys.readouterr().err
    assert expected.replace("{tmp}", tmp) in err and "Traceback" not in err, err
    assert time.perf_counter() - start < 20, "refused before anything trains"
    assert not (tmp_path / "escaped").exists() and not list(tmp_path.parent.glob("escaped"))


def test_a_search_whose_every_trial_failed_exits_1_with_the_first_error(ray_session, tmp_path, tiny_spec, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(tiny_spec(budgets=[0.001])))  # below one slice per edge: BudgetError
    assert main(["run", str(spec), "--storage", str(tmp_path), "--name", "fails"]) == 1
    err = capsys.readouterr().err
    assert "every trial failed; the first: mlp-tt-fixed-b0.001-s0-n0: BudgetError" in err


def write_idx(path, magic, dims, data=b""):
    path.write_bytes(struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in dims) + data)


@pytest.mark.parametrize("dims, expected", [
    ((-1, 28, 28), "declares negative dimensions (-1, 28, 28)"),
    ((2**31 - 1, 2**31 - 1, 2**31 - 1), "holds 0 data bytes, its header declares"),  # would overflow int64
    ((0, 28, 28), "declares (0, 28, 28): no data"),
])
def test_mnist_headers_that_lie_name_the_file(tmp_path, dims, expected):
    from ranksearch.models.data import DatasetError, load_dataset

    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", 2051, dims)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", 2049, (1,), b"\x01")
    with pytest.raises(DatasetError) as info:
        load_dataset(f"mnist:{tmp_path}")
    assert expected in str(info.value) and "train-images-idx3-ubyte" in str(info.value)


@pytest.mark.parametrize("payload", [
    {"layers": [], "state_dict": {}, "model_kwargs": {}},
    {"layers": {}, "state_dict": {}, "model_kwargs": {}},
    {"layers": {}, "state_dict": {"w": 1}, "model_kwargs": {}, "model": "mlp"},
    {"layers": {}, "state_dict": {}, "model_kwargs": {"foo": 1}, "model": "mlp"},
], ids=["layers a list", "no model", "state_dict of ints", "foreign options"])
def test_a_safe_but_foreign_checkpoint_is_not_a_ranksearch_model(tmp_path, payload):
    import torch

    from ranksearch.models.checkpoint import load_compressed

    torch.save(payload, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="is not a ranksearch model"):
        load_compressed(str(tmp_path / "foreign.pt"))
