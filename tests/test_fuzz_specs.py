"""Seeded fuzzing of what users and storage hand ranksearch: a few hundred malformed specs and
records. Each spec is `validate`d in-process (exit 0 or 2, never an exception); each broken
record is named by `report`, never a crash. Bounded: the whole test takes seconds."""

import copy
import json
import math
import random
import time

import yaml

from ranksearch.orchestrator.cli import main
from ranksearch.orchestrator.plan import build_plan
from ranksearch.orchestrator.records import ExperimentFiles
from ranksearch.search_spaces import load_spec

SPECS, RECORDS = 300, 200
JUNK = [None, -1, 0, 1, 2, 10**30, -(10**30), 1e308, -1e-308, math.inf, math.nan, True, False, "", "x" * 5000,
        "../../etc", "\u00e9\u4e2d\U0001f600", [], {}, [[[]]], {"a": {"b": {"c": []}}}, [1, "two", None],
        {"loguniform": [1, 0]}, {"choice": []}, {"uniform": [-1, 1]}, {"int": [0.5, 2]}, {"params": -5},
        {"params": 2**70}, "1e-3", "mlp", "tt", "asha", "optuna"]


def base_spec() -> dict:
    return {
        "name": "fuzz", "models": ["mlp"], "dataset": "digits", "dataset_options": {"max_train": 100},
        "formats": ["tt", "ttm"], "methods": {"l0": {"lam": {"loguniform": [0.1, 1.0]}}, "fixed": {}},
        "budgets": [0.1, {"params": 500}], "train": {"epochs": 1, "lr": 0.005},
        "search": {"searcher": "optuna", "scheduler": "asha", "samples_per_cell": 2, "seeds": [0]},
        "resources": {"cpu": 1}, "objectives": ["accuracy", "params"],
    }


def paths(value, prefix=()):
    """Every (path, value) in a nested dict/list."""
    yield prefix, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, (*prefix, i))


def mutate(value, rng: random.Random):
    value = copy.deepcopy(value)
    for _ in range(rng.randint(1, 4)):
        where, _ = rng.choice(list(paths(value)))
        if not where:
            continue
        parent = value
        for key in where[:-1]:
            parent = parent[key]
        action = rng.random()
        if action < 0.6:
            parent[where[-1]] = copy.deepcopy(rng.choice(JUNK))
        elif action < 0.8 and isinstance(parent, dict):
            del parent[where[-1]]
        elif isinstance(parent, dict):
            parent[rng.choice(["searh", "lamb", "x" * 300, "", "seed", "format"])] = rng.choice(JUNK[:12])
    return value


def text_of(value, rng: random.Random) -> bytes:
    text = json.dumps(value) if rng.random() < 0.5 else yaml.safe_dump(value)
    data = text.encode()
    r = rng.random()
    if r < 0.1:
        data = data[: rng.randrange(len(data))]
    elif r < 0.15:
        i = rng.randrange(len(data))
        data = data[:i] + bytes(rng.randrange(256) for _ in range(4)) + data[i:]
    elif r < 0.2:
        data = b"&a [" * 20 + data
    return data


def test_malformed_specs_exit_0_or_2_and_never_raise(tmp_path, capsys):
    rng = random.Random(12)
    path = tmp_path / "spec.yaml"
    codes, start = [], time.perf_counter()
    for i in range(SPECS):
        path.write_bytes(text_of(mutate(base_spec(), rng), rng))
        code = main(["validate", str(path)])  # anything but a SystemExit-free 0/2 fails here
        codes.append(code)
        err = capsys.readouterr().err
        assert code in (0, 2), (i, path.read_bytes()[:300])
        assert "Traceback" not in err and len(err) < 20_000, (i, err[:500])
    assert codes.count(2) > SPECS // 2  # most are broken: the fuzzer is not feeding valid specs
    assert time.perf_counter() - start < 120


def test_malformed_records_are_named_and_the_rest_reported(tmp_path, tiny_spec, capsys):
    rng = random.Random(7)
    spec = load_spec(tiny_spec(search={"seeds": list(range(RECORDS))}))
    plan = build_plan(spec, str(tmp_path))
    files = ExperimentFiles(str(tmp_path))
    files.write_spec(spec.to_dict())
    good = {"status": "ok", "error": None, "accuracy": 0.5, "params": 100, "dense_params": 1000, "compression": 10.0,
            "history": [{"epoch": 1, "phase": "train", "val_accuracy": 0.5}], "ranks": {"1": [2, 2]}}
    for slot in plan.slots:
        record = plan.base_record(slot, {}) | good
        broken = mutate(record, rng) if rng.random() < 0.8 else record
        data = text_of(broken, rng) if rng.random() < 0.3 else json.dumps(broken, default=str).encode()
        (tmp_path / "records").mkdir(exist_ok=True)
        (tmp_path / "records" / f"{slot.key}.json").write_bytes(data)
    start = time.perf_counter()
    records, bad = files.scan()
    assert len(records) + len(bad) == RECORDS and bad
    assert main(["report", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("left out an unreadable record") == len(bad)
    assert time.perf_counter() - start < 60
