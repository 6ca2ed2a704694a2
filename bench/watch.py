"""Watch a search the way a user would: headless-Chromium screenshots of the live report page and
the Ray dashboard while a small search runs on a `ray start` cluster, and after it ended.

    python -m bench --only watch [--quick]          # writes bench/out/watch/*.png, metrics_*.txt, watch.md

Needs a Chromium from the system's packages (Debian/Ubuntu: `apt-get install chromium-headless-shell`
or `apt-get install chromium`); without one it skips and says so. It starts its own
`ray start --head` on loopback (own ports and temp dir, token auth off) and stops only that.
What it records: when the first trial has finished, the live page (report/index.html), the
dashboard's Jobs and Actors pages and the ranksearch lines of /metrics; the same once the
driver has exited, and the metrics again 10 s later (they must still be there).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from bench._ray_head import ray_head

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
OUT = Path(__file__).resolve().parent / "out" / "watch"
REPO = Path(__file__).resolve().parents[1]


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def spec(quick: bool) -> dict:
    """Three methods, two budgets, one epoch on bundled digits: ~10 trials, a minute on 2 CPUs."""
    return {"name": "watch", "models": ["mlp"], "dataset": "digits", "dataset_options": {"max_train": 600},
            "formats": ["tt"], "methods": {"fixed": {}, "l0": {}, "lwiq": {}, "dense": {}},
            "budgets": [0.05, 0.2] if quick else [0.02, 0.05, 0.1, 0.2],
            "train": {"epochs": 2 if quick else 5, "finetune_epochs": 0, "max_rank": 8, "batch_size": 64},
            "search": {"max_concurrent": 2}, "resources": {"cpu": 1}}


def screenshot(browser: str, url: str, path: Path, *, scripts: bool) -> int:
    """PNG of `url`; a page with `scripts` (the dashboard) gets 8 s of virtual time to fetch and render
    first. The live page is static (its reload would restart virtual time). Returns the PNG's size."""
    wait = ["--virtual-time-budget=8000"] if scripts else []
    proc = subprocess.Popen([browser, "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1400",
                             *wait, f"--screenshot={path}", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the Debian launcher is a shell script: end its browser too
        proc.wait()
    return path.stat().st_size if path.exists() else 0


def ranksearch_lines(port: int) -> str:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return "\n".join(line for line in text.splitlines() if line.startswith("ray_ranksearch_"))


def page_progress(page: Path) -> tuple[int, int] | None:
    if not page.exists():
        return None
    m = re.search(r'id="progress" data-done="(\d+)" data-total="(\d+)"', page.read_text())
    return (int(m[1]), int(m[2])) if m else None


def capture(browser: str, head: dict, page: Path, when: str, rows: list) -> None:
    """Metrics and the page as they are now (copied first: the search goes on meanwhile), then screenshots."""
    metrics = ranksearch_lines(head["metrics"])
    (OUT / f"metrics_{when}.txt").write_text(metrics + "\n")
    rows.append({"when": when, "what": "metrics", "file": f"metrics_{when}.txt", "bytes": len(metrics),
                 "series": len(metrics.splitlines())})
    copy = OUT / f"{when}_page.html"
    shutil.copyfile(page, copy)
    shots = {"page": copy.as_uri(), "jobs": f"{head['dashboard']}/#/jobs", "actors": f"{head['dashboard']}/#/actors",
             "overview": f"{head['dashboard']}/#/overview"}
    for name, url in shots.items():
        path = OUT / f"{when}_{name}.png"
        size = screenshot(browser, url, path, scripts=name != "page")
        rows.append({"when": when, "what": name, "file": path.name, "bytes": size})


def run(quick: bool = True) -> dict:
    browser = find_browser()
    if browser is None:
        note = ("skipped: no Chromium found (" + ", ".join(BROWSERS) + "); install one from the system's packages, "
                "e.g. `apt-get install chromium-headless-shell`")
        print(note)
        return {"rows": [], "markdown": note, "skipped": True}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "spec.yaml").write_text(yaml.safe_dump(spec(quick)))
    rows, name = [], f"watch-{time.strftime('%Y%m%d-%H%M%S')}"
    page = OUT / "runs" / name / "report" / "index.html"
    with ray_head(OUT / "head.log", num_cpus=2) as head:
        driver = subprocess.Popen(
            [sys.executable, "-m", "ranksearch.orchestrator.cli", "run", str(OUT / "spec.yaml"), "--address",
             head["address"], "--storage", str(OUT / "runs"), "--name", name],
            cwd=REPO, env=head["env"], stdout=open(OUT / "driver.log", "w"), stderr=subprocess.STDOUT)
        try:
            while driver.poll() is None and not ((p := page_progress(page)) and p[0] >= 1):
                time.sleep(0.2)
            if driver.poll() is None:
                capture(browser, head, page, "during", rows)
            driver.wait(timeout=1800)
        finally:
            if driver.poll() is None:
                driver.kill()
        time.sleep(2)
        capture(browser, head, page, "after", rows)
        time.sleep(10)  # a series set once is gone ~5 s later at a 1 s interval: the actor sets them again
        later = ranksearch_lines(head["metrics"])
        (OUT / "metrics_later.txt").write_text(later + "\n")
        rows.append({"when": "later", "what": "metrics", "file": "metrics_later.txt", "bytes": len(later),
                     "series": len(later.splitlines())})
    lines = ["| when | what | file | bytes |", "|---|---|---|---|"]
    lines += [f"| {r['when']} | {r['what']} | {r['file']} | {r['bytes']:,} |" for r in rows]
    markdown = (f"Screenshots with `{Path(browser).name}` in `{OUT}` (driver exit code {driver.returncode}).\n\n"
                + "\n".join(lines))
    return {"rows": rows, "markdown": markdown, "driver_returncode": driver.returncode}


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv)["markdown"])
