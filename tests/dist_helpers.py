"""Run a function in N local processes joined by a gloo process group (CPU), for sharding tests.

    results = run_distributed(fn, world_size=2, args=(...))   # fn(rank, world_size, *args) -> picklable

Each process gets MASTER_ADDR / MASTER_PORT (a free port), RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE and an initialized default process group; results come back in rank order, and
an exception in any rank is re-raised here with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
    }


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, threads: int) -> None:
    os.environ.update(dist_env(rank, world_size, port))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            queue.put((rank, "ok", fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_distributed(fn: Callable[..., Any], world_size: int = 2, args: tuple = (), timeout: float = 120.0,
                    threads: int = 1) -> list[Any]:
    """fn(rank, world_size, *args) in `world_size` spawned processes; its return values by rank.

    `fn` must be importable by the children (a module-level function)."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, queue, threads), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    # stop at the first error: the other ranks would wait in a collective until the timeout
    while len(results) < world_size and not errors and time.monotonic() < deadline:
        if not queue.empty():
            rank, status, value = queue.get()
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
            continue
        dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if dead:
            time.sleep(0.5)  # its error report may still be in flight
            if queue.empty():
                errors.append(f"rank(s) {dead} exited with code(s) {[procs[r].exitcode for r in dead]} without a result")
            continue
        time.sleep(0.05)
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        raise RuntimeError("distributed worker failed\n" + "\n".join(errors))
    if len(results) < world_size:
        codes = [p.exitcode for p in procs]
        raise RuntimeError(f"distributed run incomplete after {timeout}s: results from ranks {sorted(results)}, exit codes {codes}")
    return [results[r] for r in range(world_size)]
