"""Run a function in N real processes joined by a gloo process group (the tests' harness).

    results = run_ranks(fn, world_size, *args)   # fn(rank, world_size, *args) -> picklable

``fn`` must be a module-level function (it is pickled into spawned processes). Any rank's
exception is re-raised in the caller with that rank's traceback; a group that does not finish
within ``timeout`` seconds is killed and reported as a hang.
"""
from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import os
import queue
import tempfile
import traceback


class RankFailure(AssertionError):
    """One or more ranks raised; ``errors`` maps rank → (exception type name, message, traceback)."""

    def __init__(self, errors: dict):
        self.errors = errors
        text = "\n".join(f"--- rank {r}: {tb}" for r, (_, _, tb) in sorted(errors.items()))
        super().__init__(f"{len(errors)} rank(s) failed:\n{text}")


def _worker(fn, rank, world_size, init_file, results, args, timeout_s, threads):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        value = fn(rank, world_size, *args)
        # as bytes: tensors sent through a queue live in shared memory that dies with this process
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException as exc:  # reported to the parent, never swallowed
        results.put((rank, False, (type(exc).__name__, str(exc), traceback.format_exc())))
    finally:
        # the result first: on torch < 2.8 destroying a gloo group can deadlock (its destructor
        # joins the worker threads while holding the GIL), and a result still queued would be lost
        results.close()
        results.join_thread()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0, collective_timeout: float = 60.0,
              threads: int = 1, expect_errors: bool = False):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the per-rank results.

    With ``expect_errors=True`` the per-rank outcome is returned instead of raising:
    a list of ``("ok", value)`` or ``("error", (type_name, message, traceback))``.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(fn, r, world_size, init_file, results, args, collective_timeout, threads))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        outcome = {}
        try:
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
            while len(outcome) < world_size:
                remaining = (deadline - datetime.datetime.now()).total_seconds()
                if remaining <= 0:
                    missing = sorted(set(range(world_size)) - set(outcome))
                    raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f} s (hang?)")
                try:
                    rank, ok, value = results.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outcome]
                    if dead and all(procs[r].exitcode not in (0, None) for r in dead):
                        raise RuntimeError(f"ranks {dead} died with exit codes "
                                           f"{[procs[r].exitcode for r in dead]}") from None
                    continue
                if ok:
                    import torch

                    value = torch.load(io.BytesIO(value), weights_only=True)
                outcome[rank] = (ok, value)
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
    if expect_errors:
        return [("ok", outcome[r][1]) if outcome[r][0] else ("error", outcome[r][1])
                for r in range(world_size)]
    errors = {r: v for r, (ok, v) in outcome.items() if not ok}
    if errors:
        raise RankFailure(errors)
    return [outcome[r][1] for r in range(world_size)]
