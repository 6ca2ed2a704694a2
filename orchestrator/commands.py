"""Search-level subcommands of `ranksearch`: run, resume, report, validate, submit, demo.

Bad input (an invalid spec, a resource request the cluster cannot meet, storage the
nodes do not share) raises ValueError, which cli.main turns into exit code 2.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
# Never uploaded as the job's working_dir: environments, results, caches. (This list replaces
# Ray's default excludes, which are the first four, so Ray does not warn about each of them.)
SUBMIT_EXCLUDES = [".git", ".venv", "venv", "__pycache__", "runs", "bench/out", "*.egg-info", ".pytest_cache"]
DEMO_PRESET = "mnist14-demo"


def _print_result(report_dir) -> None:
    from .report import front_table

    print(f"\nreports: {report_dir}")
    print(front_table(report_dir))
    if (Path(report_dir) / "cells.parquet").is_file():  # mean ± std per cell, paired test vs the best
        from .cells import cells_text

        print(f"\n{cells_text(report_dir)}")


EXIT_FAILED = 1  # every trial failed: the search ran but measured nothing
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report it


def _finish(result) -> int:
    """Reports, then the exit code: 130 after Ctrl-C (with the resume command), 1 when every trial failed."""
    _print_result(result.report_dir)
    if result.interrupted or result.unfinished:
        why = "interrupted" if result.interrupted else "stopped (time budget)"
        print(f"\n{why}: {result.unfinished} trial(s) unfinished; continue with: "
              f"ranksearch resume {shlex.quote(result.experiment_path)}", file=sys.stderr)
        if result.interrupted:
            return EXIT_INTERRUPTED
    if result.first_error:
        print(f"ranksearch: every trial failed; the first: {result.first_error}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_run(args) -> int:
    from .search import run_search

    return _finish(run_search(args.spec, storage_path=args.storage, name=args.name, address=args.address))


def cmd_resume(args) -> int:
    from .search import resume_search

    return _finish(resume_search(args.dir, address=args.address))


def cmd_report(args) -> int:
    from .search import regenerate_reports

    report_dir, unreadable = regenerate_reports(args.dir)
    _print_result(report_dir)
    for trial_id, why in unreadable.items():
        print(f"ranksearch report: left out an unreadable record: {why}", file=sys.stderr)
    return 0


def cmd_validate(args) -> int:
    from ranksearch.search_spaces import load_spec

    from .plan import build_plan

    from .preflight import check_machine, preflight
    from .usercode import UserCode, resolve_user_code

    spec = resolve_user_code(load_spec(args.spec), UserCode(os.getcwd()))  # import paths first: exit 2 here
    plan = build_plan(spec, experiment_path="-")
    preflight(spec, local=not args.address)
    check_machine(spec, args.address)
    search, res = spec.search, spec.resources
    cells = {slot.cell_index for slot in plan.slots}
    print(f"{spec.name}: valid")
    print(f"  grid: {len(cells)} cells = models {spec.models} x formats {spec.formats} x methods "
          f"{list(spec.methods)} x budgets {spec.budgets} (dense: one cell per model)")
    print(f"  trials: {len(plan.slots)} (seeds {search['seeds']}, up to {search['samples_per_cell']} samples per cell)")
    print(f"  search: searcher {search['searcher']}, scheduler {search['scheduler']}; "
          f"per trial: cpu {res['cpu']:g}, gpu {res['gpu']:g}, workers {res['workers']}")
    objectives = ", ".join(f"{o['metric']} ({o['mode']})" for o in spec.objectives)
    print(f"  objectives: {objectives}")
    return 0


def cmd_submit(args) -> int:
    """Validate here, then run the search on the cluster as a Ray job with this project as working_dir.

    The entrypoint is `python -m ranksearch.orchestrator.cli run ...` rather than the `ranksearch` script:
    it runs the uploaded copy of the code (the job's working directory comes first on the
    path), where an installed script would import whatever copy the cluster installed."""
    from ranksearch.search_spaces import load_spec
    from ranksearch.search_spaces.schema import is_user_model

    from .usercode import UserCode, resolve_user_code

    # a bad spec fails here, not minutes later on the cluster; a spec naming the user's own code
    # ships the user's project (the current directory), where its import paths resolve
    spec = resolve_user_code(load_spec(args.spec), UserCode(os.getcwd()))
    root = Path.cwd() if any(is_user_model(m) for m in spec.models) or spec.task else PROJECT_DIR
    name = args.name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"  # known here: the job is named by it
    entrypoint = ["python", "-m", "ranksearch.orchestrator.cli", "run", _spec_on_cluster(args.spec, root)]
    for flag, value in (("--storage", args.storage), ("--name", name)):
        if value:
            entrypoint += [flag, value]
    client = _job_client(args.address)
    os.environ["RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES"] = ""
    job_id = client.submit_job(
        entrypoint=shlex.join(entrypoint),
        runtime_env={"working_dir": str(root), "excludes": SUBMIT_EXCLUDES},
        metadata={"job_name": f"ranksearch:{name}"},  # the Name column of the dashboard's Jobs table
    )
    print(f"submitted {job_id}: {shlex.join(entrypoint)}")
    print(f"  follow: ray job logs --follow {job_id} --address {args.address}")
    if not args.wait:
        return 0
    status = _wait(client, job_id)
    print(client.get_job_logs(job_id), end="")
    print(f"{job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _spec_on_cluster(spec: str, root: Path = PROJECT_DIR) -> str:
    """The spec as the job sees it: a preset name as is, a file relative to the uploaded project."""
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        return spec  # a preset name (load_spec accepted it)
    if not path.is_relative_to(root):
        raise ValueError(f"SPEC: {spec} is outside the project directory {root}, which is what the job "
                         "uploads; copy the spec into the project or use a preset name")
    return path.relative_to(root).as_posix()


def auth_token() -> str | None:
    """The Ray auth token from where Ray itself looks: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH,
    then ~/.ray/auth_token (written by `ray get-auth-token --generate`)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def _job_client(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    _check_job_server(address)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        found = "was refused" if token else "was not found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)"
        raise ValueError(f"--address: {address} requires a Ray auth token, and one {found}; "
                         "use the cluster's token (cluster.yaml copies ~/.ray/auth_token to its nodes)") from None
    except (ConnectionError, RuntimeError) as exc:
        raise ValueError(f"--address: cannot reach the Ray job server at {address}: {exc}") from None


def _check_job_server(address: str) -> None:
    """Fail in seconds when nothing listens at the job server's host:port (the client retries for a minute)."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(address if "://" in address else f"http://{address}")
    try:
        port = url.port or (443 if url.scheme == "https" else 8265)
    except ValueError:
        raise ValueError(f"--address: {address!r} has no valid port") from None
    if not url.hostname:
        raise ValueError(f"--address: expected http://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((url.hostname, port), timeout=5).close()
    except OSError as exc:
        raise ValueError(f"--address: cannot reach the Ray job server at {address}: nothing answers at "
                         f"{url.hostname}:{port} ({exc})") from None


def _wait(client, job_id: str, poll_s: float = 2.0) -> str:
    from ray.job_submission import JobStatus

    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(poll_s)
    return str(status.value)


def cmd_demo(args) -> int:
    """The mnist14-demo preset: every method vs fixed and dense on bundled 14x14 MNIST, two seeds."""
    from .search import run_search

    result = run_search(DEMO_PRESET, storage_path=args.storage, name=args.name)
    _print_result(result.report_dir)
    return 0


def add_commands(sub) -> None:
    def where(p):
        p.add_argument("--storage", help="where experiments live: a directory (NFS for multi-node) or "
                                         "s3://... / gs://... (default: the spec's storage, else ./runs)")
        p.add_argument("--name", help="experiment name (default: <spec name>-<timestamp>)")

    p = sub.add_parser("run", help="run a search: SPEC is a YAML file or a preset name")
    p.add_argument("spec")
    where(p)
    p.add_argument("--address", help="join this Ray cluster ('auto', 'ray://HOST:10001'); default: start Ray here")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", help="continue an interrupted search; no finished trial is re-run")
    p.add_argument("dir", help="the experiment directory (<storage>/<name>)")
    p.add_argument("--address", help="join this Ray cluster; default: start Ray here")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("report", help="rebuild the reports of an experiment from its records and print the fronts")
    p.add_argument("dir", help="the experiment directory (<storage>/<name>)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("validate", help="check a spec without running it (exit 2 listing every error)")
    p.add_argument("spec")
    p.add_argument("--address", help="check resources against this Ray cluster (default: against this machine)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("submit", help="run a search on a Ray cluster as a Ray job (this project as working_dir)")
    p.add_argument("spec", help="a preset name or a spec file inside this project")
    p.add_argument("--address", required=True, help="the cluster's job server, e.g. http://127.0.0.1:8265 "
                                                    "(through `ray dashboard cluster.yaml`)")
    where(p)
    p.add_argument("--wait", action="store_true", help="wait for the job, print its logs, exit 1 unless it succeeded")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("demo", help=f"run the {DEMO_PRESET} preset and print its Pareto fronts (what `make demo` runs)")
    where(p)
    p.set_defaults(func=cmd_demo)
