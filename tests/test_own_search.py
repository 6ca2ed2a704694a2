"""Searches over a user's own models and data: import-path specs through `ranksearch run` on a real
local Ray, Python objects through `run_search`, validation of user code, saved front models, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO

PROJECT = os.path.join(REPO, "tests", "user_project")
USER_MODULES = ("models", "data", "task")


@pytest.fixture
def in_project(monkeypatch):
    """Run from the user's project directory, as a user would; their modules are forgotten after."""
    monkeypatch.chdir(PROJECT)
    saved_path = list(sys.path)
    saved_modules = {m: sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] in USER_MODULES}
    sys.path.insert(0, PROJECT)  # a user's script directory comes first on its path
    yield PROJECT
    sys.path[:] = saved_path
    for name in [m for m in sys.modules if m.split(".")[0] in USER_MODULES]:
        del sys.modules[name]
    sys.modules.update(saved_modules)


def _spec(tmp_path, **changes) -> str:
    with open(os.path.join(PROJECT, "search.yaml")) as f:
        spec = yaml.safe_load(f)
    spec.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


BAD = {
    "missing module": ({"models": ["nosuchpkg.nets:build"]}, "models[0]: cannot import module 'nosuchpkg.nets'"),
    "missing attribute": ({"models": ["models.nets:build_nothing"]}, "models[0]: module 'models.nets' has no attribute 'build_nothing'"),
    "model factory returns data": ({"models": ["data:load"]}, "models[0]: 'data:load' returned dict, not a torch.nn.Module"),
    "model factory raises": ({"models": ["data:broken"]}, "models[0]: 'data:broken' raised RuntimeError: the data server is down"),
    "dataset factory raises": ({"dataset": "data:broken"}, "dataset: 'data:broken' raised RuntimeError: the data server is down"),
    "dataset of the wrong shape": ({"dataset": "data:not_data"}, "dataset: the factory returned int"),
    "missing dataset module": ({"dataset": "nodata:load"}, "dataset: cannot import module 'nodata'"),
    "task not found": ({"task": "task:Nothing"}, "task: module 'task' has no attribute 'Nothing'"),
    "task path malformed": ({"task": "task"}, "task: expected an import path"),
    "pretrained without checkpoint": ({"init": "pretrained"}, "checkpoint: init: pretrained needs a trained state_dict"),
    "checkpoint missing": ({"init": "pretrained", "checkpoint": "nowhere.pt"}, "checkpoint: nowhere.pt (for models.nets:build_text) does not exist"),
    "built-in model on user data": ({"models": ["mlp"]}, "dataset: model 'mlp' and dataset 'data:load'"),
}


@pytest.mark.parametrize("changes, message", BAD.values(), ids=BAD.keys())
def test_validate_resolves_import_paths_and_names_the_field(in_project, tmp_path, capsys, changes, message):
    from ranksearch.orchestrator.cli import main

    assert main(["validate", _spec(tmp_path, **changes)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_validate_accepts_the_project_spec(in_project, capsys):
    from ranksearch.orchestrator.cli import main

    assert main(["validate", "search.yaml"]) == 0
    out = capsys.readouterr().out
    assert "objectives: macro_recall (max), params (min)" in out  # the task's own metric, resolved


def test_ranksearch_run_with_import_paths_on_local_ray(tmp_path):
    """`ranksearch run` from the user's directory: its workers import the project's own `models`
    package; front models are kept and export (compressed or dense) loads back."""
    storage = tmp_path / "runs"
    env = {**os.environ, "RAY_CHDIR_TO_TRIAL_DIR": "0"}
    spec = _spec(tmp_path, methods=["fixed", "lwiq"], train={"epochs": 1, "finetune_epochs": 0, "max_rank": 8})
    run = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ranksearch"), "run", spec,
                          "--storage", str(storage), "--name", "own"], cwd=PROJECT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    experiment = storage / "own"
    import pandas as pd

    trials = pd.read_parquet(experiment / "report" / "trials.parquet")
    assert set(trials["status"]) == {"ok"} and len(trials) == 2
    assert (trials["macro_recall"] > 0.5).all() and trials["budget_met"].all()
    pareto = pd.read_parquet(experiment / "report" / "pareto.parquet")
    front = set(pareto["trial_id"])
    kept = {p.removesuffix(".pt") for p in os.listdir(experiment / "models")}
    assert kept == front
    trial = sorted(front)[0]
    script = f"""
import torch, ranksearch, sys
from ranksearch.orchestrator.export import export
from models.nets import TextClassifier
export({str(experiment)!r}, {trial!r}, {str(tmp_path / 'c.pt')!r})
export({str(experiment)!r}, {trial!r}, {str(tmp_path / 'd.pt')!r}, dense=True)
net = ranksearch.load({str(tmp_path / 'c.pt')!r}, model="models.nets:build_text")
plain = TextClassifier()
plain.load_state_dict(torch.load({str(tmp_path / 'd.pt')!r}, weights_only=True))
x = torch.randint(0, 64, (5, 16))
with torch.no_grad():
    assert torch.allclose(net(x), plain.eval()(x), atol=1e-4)
print(net.ranksearch_record["trial_id"])
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == trial
    missing = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ranksearch"), "export", str(experiment),
                              "--trial", "nope", "--out", str(tmp_path / "x.pt")], capture_output=True, text=True)
    assert missing.returncode == 2 and "no saved model for 'nope'" in missing.stderr


def test_run_search_takes_python_objects(ray_session, tmp_path, in_project):
    """models={name: factory}, dataset=callable, task=class, with a pretrained start from a checkpoint."""
    import torch

    import ranksearch
    from models.nets import SmallCNN  # the project's own package, not ranksearch.models

    import data

    def loader(**options):
        return data.load("images", n_train=256, n_val=128, n_test=128)

    class Task:
        metric_name, metric_mode = "error_rate", "min"

        @staticmethod
        def metric(model, batches):
            wrong = total = 0
            with torch.no_grad():
                for x, y in batches:
                    wrong += int((model(x).argmax(1) != y).sum())
                    total += len(y)
            return wrong / total

    torch.manual_seed(0)
    trained = ranksearch.compress(SmallCNN(), loader()["train"], loader()["val"], method="dense", epochs=3,
                                  progress=False)
    checkpoint = tmp_path / "cnn.pt"
    torch.save(trained.model.state_dict(), checkpoint)
    spec = {"name": "objects", "formats": ["tucker"], "methods": ["lwiq"], "budgets": [0.2],
            "train": {"epochs": 1, "finetune_epochs": 0, "max_rank": 8}, "resources": {"cpu": 1},
            "init": "pretrained", "checkpoint": str(checkpoint)}
    result = ranksearch.run_search(spec, storage_path=str(tmp_path / "runs"), models={"cnn": SmallCNN},
                                   dataset=loader, task=Task)
    (record,) = result.records
    assert record["status"] == "ok", record.get("error")
    assert record["model"] == "cnn" and record["metric"] == "error_rate" and record["init"] == "pretrained"
    assert record["dense_metric"] is not None and record["error_rate"] < 0.5
    assert record["start_metrics"]["error_rate"] < 0.3  # starts from the trained net, not at chance (0.75)
    pareto = result.pareto
    assert "error_rate" in pareto.columns and list(pareto["trial_id"].unique()) == [record["trial_id"]]
    assert os.path.isfile(os.path.join(result.experiment_path, "models", f"{record['trial_id']}.pt"))
