"""Test helpers that turn a would-be DDP hang into an error: code that runs on one process must never enter a
collective, since the other processes are elsewhere and the collective waits forever (or pairs with an unrelated
one and corrupts it).

    with collectives_forbidden():          # inside a rank-0-only block: any torch.distributed collective raises
        evaluation.reference()

    outcomes = on_process_zero_of_two(run_tasks, args, tmp_path)   # a real 2-process gloo group
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from unittest import mock

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "monitored_barrier",
    "batch_isend_irecv",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
    "send_object_list",
    "recv_object_list",
)


class CollectiveInOneProcessCode(RuntimeError):
    """A torch.distributed collective was called where only one process runs: under DDP, a hang."""


@contextmanager
def collectives_forbidden() -> Iterator[None]:
    """Every torch.distributed collective (in both the public and the c10d namespace) raises inside the block."""

    def refuse(name: str) -> Callable:
        def collective(*args, **kwargs):
            raise CollectiveInOneProcessCode(f"torch.distributed.{name} called in code that runs on one process")

        return collective

    refusals = {name: refuse(name) for name in COLLECTIVES}
    with mock.patch.multiple(dist, **refusals), mock.patch.multiple(c10d, **refusals):
        yield


def run_forbidding_collectives(tasks: dict[str, Callable[[], object]]) -> dict[str, str]:
    """Run each task under ``collectives_forbidden``: "ok", or the error's last traceback lines."""
    outcomes = {}
    for name, task in tasks.items():
        try:
            with collectives_forbidden():
                task()
            outcomes[name] = "ok"
        except Exception:  # noqa: BLE001 - every failure is reported back to the test
            outcomes[name] = "".join(traceback.format_exc().splitlines(keepends=True)[-6:])
    return outcomes


def _process(rank: int, port: int, target: Callable[..., dict[str, str]], args: tuple, out_file: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        if rank == 0:  # process 1 goes straight to the barrier, as a DDP process skipping a rank-0-only block does
            Path(out_file).write_text(json.dumps(target(*args)))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def on_process_zero_of_two(
    target: Callable[..., dict[str, str]], args: tuple, work_dir: Path, timeout: float = 120
) -> dict[str, str]:
    """Start a real 2-process gloo group; process 0 runs ``target(*args)`` (a module-level function returning
    per-task outcomes) while process 1 waits at a barrier. Past ``timeout`` seconds both are killed: AssertionError.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out_file = work_dir / "outcomes.json"
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_process, args=(rank, port, target, args, str(out_file))) for rank in (0, 1)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for rank in hung:
        processes[rank].kill()
        processes[rank].join()
    assert not hung, f"process(es) {hung} still running after {timeout} s: a collective is waiting"
    assert [process.exitcode for process in processes] == [0, 0], [process.exitcode for process in processes]
    return json.loads(out_file.read_text())
