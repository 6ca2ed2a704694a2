"""Kill the driver mid-search with SIGKILL, resume: nothing finished is lost or run again."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO
from ranksearch.orchestrator.cli import main

TRIALS = 12


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_resume_after_sigkill_loses_and_reruns_nothing(ray_session, tmp_path, tiny_spec, monkeypatch):
    spec = tiny_spec(
        dataset_options={"max_train": 1000}, train={"epochs": 3, "finetune_epochs": 0, "max_rank": 4},
        search={"seeds": list(range(TRIALS)), "max_concurrent": 1},
    )
    spec_path, log = tmp_path / "spec.yaml", tmp_path / "started.log"
    spec_path.write_text(json.dumps(spec))  # JSON is YAML
    experiment = tmp_path / "runs" / "resume"
    records = experiment / "records"

    # The driver and the Ray it starts share a new process group: SIGKILL takes them down at once,
    # as when the machine running the driver dies.
    with open(tmp_path / "driver.out", "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "ranksearch.orchestrator.cli", "run", str(spec_path), "--storage", str(tmp_path / "runs"),
             "--name", "resume"],
            cwd=REPO, env={**os.environ, "RANKSEARCH_TRIAL_LOG": str(log)}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for(lambda: len(list(records.glob("*.json"))) >= 3, 300, "three finished trials")
        finally:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    done_before = {p.stem: p.read_text() for p in records.glob("*.json")}
    assert len(done_before) < TRIALS, "the search finished before the kill: nothing left to resume"
    assert list(experiment.glob("experiment_state-*.json")), "Tune saved no state: restore untested"

    monkeypatch.setenv("RANKSEARCH_TRIAL_LOG", str(log))
    assert main(["resume", str(experiment)]) == 0

    after = {p.stem: p.read_text() for p in records.glob("*.json")}
    assert len(after) == TRIALS
    assert all(json.loads(text)["status"] == "ok" for text in after.values())
    assert {k: after[k] for k in done_before} == done_before  # finished before the kill: untouched
    started = log.read_text().split()
    assert set(started) == set(after)
    assert all(started.count(key) == 1 for key in done_before), "a finished trial trained again"
