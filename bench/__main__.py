"""`make bench`: run the benchmark modules of this package and write their results.

    python -m bench [--only NAME[,NAME...]] [--quick] [--out DIR] [--device cpu|cuda] [--dataset SPEC]
                    [--jobs N] [--seeds N] [--list]

A benchmark is any module `bench/<name>.py` (not starting with `_`) that defines

    def run(quick: bool) -> dict   # {"rows": [dict, ...], "markdown": str, ...anything else}

It may also accept `device`, `dataset`, `jobs` and `seeds` keywords, which receive the options of those names. Nothing needs
registering: adding the file is enough. Each module's result goes to
`<out>/<name>.json` (the dict plus run metadata) and `<out>/<name>.md`; every
`<name>.json` found in `<out>` is then collected into `<out>/REPORT.md`, so a
partial run (`--only`) refreshes its own section and keeps the others.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import os
import pkgutil
import platform
import sys
import time
import traceback
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = PACKAGE_DIR / "out"


def available() -> list[str]:
    """Every benchmark module of this package, by name."""
    return sorted(
        m.name for m in pkgutil.iter_modules([str(PACKAGE_DIR)]) if not m.name.startswith("_") and not m.ispkg
    )


def _environment() -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        env["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return env


def run_one(name: str, *, quick: bool, device: str | None, dataset: str | None = None, jobs: int | None = None,
            seeds: int | None = None) -> dict:
    """Import bench/<name>.py, call its run(), check the result's shape, add metadata.

    `device`, `dataset`, `jobs` and `seeds` go only to modules whose run() takes them."""
    module = importlib.import_module(f"bench.{name}")
    runner = getattr(module, "run", None)
    if not callable(runner):
        raise TypeError(f"bench/{name}.py has no run(quick) function")
    kwargs = {"quick": quick}
    for option, value in (("device", device), ("dataset", dataset), ("jobs", jobs), ("seeds", seeds)):
        if value is not None and option in inspect.signature(runner).parameters:
            kwargs[option] = value
    started = time.time()
    result = runner(**kwargs)
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list) or not isinstance(
        result.get("markdown"), str
    ):
        raise TypeError(f"bench/{name}.py: run() must return a dict with 'rows' (list) and 'markdown' (str)")
    result["meta"] = {
        "name": name,
        "quick": quick,
        "device": device or "cpu",
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "wall_time_s": round(time.time() - started, 2),
        "environment": _environment(),
        **result.get("meta", {}),
    }
    return result


def write_result(out: Path, name: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(result["markdown"].rstrip() + "\n")


def write_report(out: Path) -> Path:
    """REPORT.md: every result in `out`, one section each."""
    sections = []
    for path in sorted(out.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(result, dict) or "markdown" not in result:
            continue
        meta = result.get("meta", {})
        env = meta.get("environment", {})
        where = ", ".join(
            str(x) for x in (
                f"torch {env.get('torch')}", f"{env.get('torch_threads')} threads", f"{env.get('cpus')} cpus",
                env.get("cuda") and f"GPU {env['cuda']}", meta.get("device") and f"device {meta['device']}",
                env.get("load_average") and f"load average {env['load_average']}",
            ) if x
        )
        status = f"{meta.get('finished', '?')}, {meta.get('wall_time_s', '?')} s{', --quick' if meta.get('quick') else ''}"
        sections.append(f"## {path.stem}\n\n_{status}; {where}_\n\n{result['markdown'].rstrip()}\n")
    report = out / "REPORT.md"
    report.write_text("# ranksearch benchmarks\n\n" + ("\n".join(sections) if sections else "No results yet.\n"))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help="run only these benchmarks (repeat or comma-separate); default: all")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats: a smoke run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--device", default=None, help="passed to benchmarks that take a device (cpu, cuda)")
    parser.add_argument("--dataset", default=None,
                        help="passed to benchmarks that take a dataset (quality: e.g. mnist:DIR; default digits)")
    parser.add_argument("--jobs", type=int, default=None, help="benchmarks that take it (quality) run this many fits at once")
    parser.add_argument("--seeds", type=int, default=None, help="benchmarks that take it (quality) average this many seeds")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)

    names = available()
    if args.list:
        print("\n".join(names))
        return 0
    if args.only:
        wanted = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            parser.error(f"--only: unknown benchmark(s) {unknown}; available: {names}")
        names = wanted

    failed = []
    for name in names:
        print(f"== bench {name}{' (quick)' if args.quick else ''}", flush=True)
        try:
            result = run_one(name, quick=args.quick, device=args.device, dataset=args.dataset, jobs=args.jobs,
                             seeds=args.seeds)
        except Exception:  # one broken benchmark must not hide the others' results
            traceback.print_exc()
            failed.append(name)
            continue
        write_result(args.out, name, result)
        print(result["markdown"].rstrip() + "\n", flush=True)
    report = write_report(args.out)
    print(f"wrote {report}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
