"""The search commands of `ranksearch`: exit codes, what they print, nothing started on bad input,
and job submission to a token-authenticated head."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from bench._ray_head import ray_head
from conftest import REPO
from ranksearch.orchestrator.cli import main

BAD_SPECS = [  # (sections replaced in a valid spec, an error line it must produce)
    ({"searh": {}}, "searh: unknown key; did you mean 'search'?"),
    ({"models": ["mlp", "mpl"]}, "models[1]: expected one of: mlp,"),
    ({"methods": {"l0": {"lamb": 0.1}}}, "methods.l0.lamb: unknown hyperparameter; did you mean 'lam'?"),
    ({"methods": {"bayes": {}}}, "methods.bayes: expected one of: bayesian,"),
    ({"formats": ["tx"]}, "formats[0]: expected one of: cp, tucker, tt, ttm, got 'tx'"),
    ({"budgets": [0.1, 1.5]}, "budgets[1]: 1.5 is outside (0, 1]"),
    ({"train": {"epochs": "ten"}}, "train.epochs: expected a positive integer, got 'ten'"),
    ({"resources": {"gpu": -1}}, "resources.gpu: expected a non-negative number, got -1"),
    ({"search": {"scheduler": "asha"}, "objectives": ["compression", "params"]}, "search.asha_metric: 'compression'"),
]


def write_spec(path, spec) -> str:
    path.write_text(json.dumps(spec))  # JSON is YAML
    return str(path)


def ray_is_up() -> bool:
    import ray

    return ray.is_initialized()


@pytest.mark.parametrize("sections, error", BAD_SPECS, ids=[e.split(":")[0] for _, e in BAD_SPECS])
def test_bad_specs_exit_2_naming_the_field_and_start_nothing(tmp_path, tiny_spec, capsys, sections, error):
    spec = write_spec(tmp_path / "bad.yaml", tiny_spec(**sections))
    ray_before = ray_is_up()
    for command in (["validate", spec], ["run", spec, "--storage", str(tmp_path / "runs")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ranksearch {command[0]}: error: ") and error in err, err
    assert not (tmp_path / "runs").exists() and ray_is_up() == ray_before


def test_validate_lists_every_error_at_once(tmp_path, tiny_spec, capsys):
    broken = {}
    for sections, _ in BAD_SPECS[:-1]:
        broken |= {k: v | broken.get(k, {}) if isinstance(v, dict) else v for k, v in sections.items()}
    assert main(["validate", write_spec(tmp_path / "bad.yaml", tiny_spec(**broken))]) == 2
    err = capsys.readouterr().err
    assert "(8 errors)" in err and all(error in err for _, error in BAD_SPECS[:-1])


def test_validate_summarizes_a_good_spec(capsys):
    assert main(["validate", "digits-quick"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("digits-quick: valid") and "grid: 25 cells" in out and "trials: 25" in out


def test_gpu_request_on_a_cpu_machine_exits_2_before_ray_starts(tmp_path, tiny_spec, capsys):
    spec = write_spec(tmp_path / "gpu.yaml", tiny_spec(resources={"cpu": 1, "gpu": 1}))
    assert main(["validate", spec]) == 2  # this machine has no GPU (--address checks a cluster)
    assert "resources.gpu: a trial needs 1 GPU" in capsys.readouterr().err
    capsys.readouterr()
    ray_before = ray_is_up()
    assert main(["run", spec, "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "resources.gpu: a trial needs 1 GPU" in err and "offers 0" in err
    assert not (tmp_path / "runs").exists() and ray_is_up() == ray_before


def test_run_with_an_address_nobody_answers_exits_2_at_once(tmp_path):
    """In a fresh process, as users run it (this one may already hold the session's Ray)."""
    done = subprocess.run(
        [sys.executable, "-m", "ranksearch.orchestrator.cli", "run", "tests/specs/tiny.yaml", "--address", "127.0.0.1:1",
         "--storage", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "ranksearch run: error: --address: nothing answers at '127.0.0.1:1'" in done.stderr
    assert not list(tmp_path.iterdir())


def test_resume_and_report_need_an_experiment(tmp_path, capsys):
    assert main(["resume", str(tmp_path)]) == 2
    assert "not a ranksearch experiment" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "not a ranksearch experiment" in capsys.readouterr().err


def test_run_prints_the_fronts_and_report_rebuilds_them(ray_session, tmp_path, tiny_spec, capsys):
    spec = write_spec(tmp_path / "tiny.yaml", tiny_spec(budgets=[0.02, 0.05]))
    runs = tmp_path / "runs"
    assert main(["run", spec, "--storage", str(runs), "--name", "cli"]) == 0
    out = capsys.readouterr().out
    assert "[2/2] ok" in out and f"reports: {runs / 'cli' / 'report'}" in out
    table = out[out.index("group"):]
    assert "mlp/fixed" in table and "hypervolume reference point" in table
    assert "cells (mean over seeds" in table and "single seed per cell" in table  # orchestrator/cells.py

    shutil.rmtree(runs / "cli" / "report")
    assert main(["report", str(runs / "cli")]) == 0
    assert capsys.readouterr().out.endswith(table)
    assert {p.name for p in (runs / "cli" / "report").iterdir()} == {
        "trials.parquet", "layers.parquet", "pareto.parquet", "pareto.png", "index.html", "cells.parquet"}

    assert main(["run", spec, "--storage", str(runs), "--name", "cli"]) == 2  # never mixes two searches
    assert "exists; continue it with `ranksearch resume" in capsys.readouterr().err


# --- submit ---------------------------------------------------------------------


def test_submit_refuses_bad_input_before_contacting_a_cluster(tmp_path, tiny_spec, capsys):
    bad = write_spec(tmp_path / "bad.yaml", tiny_spec(budgets=[2.5]))
    assert main(["submit", bad, "--address", "http://127.0.0.1:1"]) == 2
    assert "budgets[0]" in capsys.readouterr().err
    outside = write_spec(tmp_path / "tiny.yaml", tiny_spec())
    assert main(["submit", outside, "--address", "http://127.0.0.1:1"]) == 2
    assert "outside the project directory" in capsys.readouterr().err
    assert main(["submit", "tests/specs/tiny.yaml", "--address", "http://127.0.0.1:1"]) == 2
    assert "cannot reach the Ray job server at http://127.0.0.1:1" in capsys.readouterr().err


@pytest.fixture
def token_head(tmp_path):
    """A `ray start --head` with token auth, every port its own."""
    token = "ranksearch-test-token-" + os.urandom(8).hex()
    with ray_head(tmp_path / "head.log", timeout_s=180, auth_token=token) as head:
        yield head["dashboard"], token


def test_submit_runs_the_search_as_a_ray_job_with_token_auth(token_head, tmp_path, monkeypatch, capsys):
    url, token = token_head
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    assert main(["submit", "tests/specs/tiny.yaml", "--address", url]) == 2
    assert "requires a Ray auth token, and one was not found" in capsys.readouterr().err

    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    storage = tmp_path / "job-runs"
    assert main(["submit", "tests/specs/tiny.yaml", "--address", url, "--storage", str(storage),
                 "--name", "job", "--wait"]) == 0
    out = capsys.readouterr().out
    assert "python -m ranksearch.orchestrator.cli run tests/specs/tiny.yaml" in out and out.rstrip().endswith("SUCCEEDED")
    assert "[1/1] ok" in out  # the job's own log: the search ran on the cluster
    assert (storage / "job" / "report" / "pareto.parquet").is_file()
