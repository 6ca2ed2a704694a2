"""Kill the driver mid-search with SIGKILL, resume: nothing finished is lost or run again;
records that went missing or corrupt run again; nothing in the experiment folder is unpickled."""

import json
import os
import pickle
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
    assert list(experiment.glob("experiment_state-*.json")), "Tune saved no state"

    # Whoever can write the folder: a tuner.pkl that runs code when unpickled, one finished record
    # deleted, one truncated mid-file.
    marker = tmp_path / "pwned"
    (experiment / "tuner.pkl").write_bytes(pickle.dumps(Payload(str(marker))))
    deleted, truncated, *kept = sorted(done_before)
    (records / f"{deleted}.json").unlink()
    (records / f"{truncated}.json").write_text(done_before[truncated][:40])

    monkeypatch.setenv("RANKSEARCH_TRIAL_LOG", str(log))
    assert main(["resume", str(experiment)]) == 0
    assert not marker.exists(), "resume unpickled tuner.pkl from the experiment folder"

    after = {p.stem: p.read_text() for p in records.glob("*.json")}
    assert len(after) == TRIALS
    assert all(json.loads(text)["status"] == "ok" for text in after.values())
    assert {k: after[k] for k in kept} == {k: done_before[k] for k in kept}  # finished before the kill: untouched
    assert [p.name.split("-")[:-1] for p in (records / ".invalid").glob("*.json")] == [truncated.split("-")]
    started = log.read_text().split()
    assert set(started) == set(after)
    assert all(started.count(key) == 1 for key in kept), "a finished trial trained again"
    assert started.count(deleted) == started.count(truncated) == 2  # their records were gone: run again
    unfinished = set(after) - set(done_before)
    assert all(started.count(key) <= 2 for key in unfinished)  # at most the one cut short by the kill, then once


class Payload:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_ctrl_c_writes_the_report_of_what_finished_and_says_how_to_resume(tmp_path, tiny_spec):
    trials = 8
    spec = tiny_spec(dataset_options={"max_train": 1000}, train={"epochs": 3, "finetune_epochs": 0, "max_rank": 4},
                     search={"seeds": list(range(trials)), "max_concurrent": 1})
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(json.dumps(spec))
    experiment = tmp_path / "runs" / "ctrlc"
    with open(tmp_path / "driver.out", "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "ranksearch.orchestrator.cli", "run", str(spec_path), "--storage", str(tmp_path / "runs"),
             "--name", "ctrlc"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: len(list((experiment / "records").glob("*.json"))) >= 2, 300, "two finished trials")
            os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
            rc = driver.wait(timeout=120)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
    output = (tmp_path / "driver.out").read_text()
    assert rc == 130, output
    assert "Traceback" not in output, output
    assert f"ranksearch resume {experiment}" in output
    records = {p.stem: json.loads(p.read_text()) for p in (experiment / "records").glob("*.json")}
    assert 2 <= len(records) < trials and all(r["status"] == "ok" for r in records.values())
    import pandas as pd

    reported = pd.read_parquet(experiment / "report" / "trials.parquet")
    assert set(reported.trial_id) == set(records)
