"""The workers of a preprocess run: how many (cores, samples, memory), and the forkserver pool that runs
them, which dies with medctl."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import ExitStack

from medctl.data.cache.memory import WORKER_BASE_BYTES, memory_budget, worker_memory_bytes
from medctl.data.cache.sample import SampleOutcome, SampleTask
from medctl.io import process_alive
from medctl.progress import progress_bar
from medctl.storage import is_remote

MIN_SAMPLES_PER_WORKER = 8  # a process pool costs seconds to start; small batches run inline
HEADER_PROBES = 8  # headers read to size the workers: those of the samples with the most bytes


def worker_count(requested: int, tasks: list[SampleTask], memory_gb: float) -> tuple[int, str]:
    """Workers to start, and the line that says why: no more than requested, than the cores, than
    tasks // MIN_SAMPLES_PER_WORKER, and than fit in memory at :func:`worker_memory_bytes` each."""
    if not tasks:
        return 1, "nothing to process"
    cores, by_tasks = os.cpu_count() or 1, max(1, len(tasks) // MIN_SAMPLES_PER_WORKER)
    need, shown = largest_sample(tasks)
    budget = memory_budget(memory_gb)
    by_memory = max(1, int(budget // need) - 1)  # the parent works too while the pool starts (see run_tasks)
    workers = max(1, min(requested, cores, by_tasks, by_memory))
    where = "data.preprocess.memory_gb" if memory_gb else "available now"
    limits = [
        (cores, f"{cores} CPU core(s)"),
        (by_tasks, f"{len(tasks)} sample(s) to process, one worker per {MIN_SAMPLES_PER_WORKER}"),
        (by_memory, f"memory for {by_memory}"),
    ]
    why = [text for limit, text in limits if limit < requested]
    asked = f"asked {requested}" + (f"; fewer: {', '.join(why)}" if why else "")
    line = (
        f"{workers} worker(s) ({asked}); largest {shown} needs ~{need / 2**30:.1f} GB "
        f"per worker, {budget / 2**30:.1f} GB {where}"
    )
    if need > budget:
        line += "; it may not fit even alone: free memory or raise data.preprocess.memory_gb"
    return workers, line


def largest_sample(tasks: list[SampleTask]) -> tuple[int, str]:
    """(bytes a worker needs for it, "volume DxHxW" / "recording C ch x N samples") for the largest sample,
    from the headers of the HEADER_PROBES samples with the most bytes. Remote files are not fetched for this:
    their size stands in (as int16 at 2:1 gzip)."""
    biggest = sorted(tasks, key=lambda t: -sum(f.size for f in t.image))[:HEADER_PROBES]
    best, shown = 0, "sample ?"
    for task in biggest:
        files = task.image
        if any(is_remote(f.url) for f in files):
            size = sum(f.size for f in files)
            need, label = worker_memory_bytes(size), f"sample ~{size / 2**20:.0f} MB object"
        else:
            found = task.modality.memory_need(files)
            if found is None:  # an unreadable or impossible header: the worker that reads it records it
                continue
            need, label = found
        if need > best:
            best, shown = need, label
    return best or WORKER_BASE_BYTES, shown


def run_tasks(
    tasks: list[SampleTask], workers: int, process: Callable[[SampleTask], SampleOutcome]
) -> Iterable[SampleOutcome]:
    """``process`` each task inline (1 worker) or in a forkserver process pool, with a progress bar.

    The pool takes seconds to start (a fresh interpreter imports torch and MONAI), so the parent
    processes samples itself until a worker answers a ping: the start-up no longer costs throughput.
    Then the pool is fed 2 tasks per worker at a time, so breaking out of the loop leaves little to cancel.
    """
    if not tasks:
        return
    queue = list(reversed(tasks))  # pop() takes them in order
    with progress_bar("preprocess", total=len(tasks)) as bar, ExitStack() as stack:
        if workers == 1:
            while queue:
                outcome = process(queue.pop())
                bar.advance(1)
                yield outcome
            return
        pool = stack.enter_context(
            ProcessPoolExecutor(
                workers, mp_context=pool_context(), initializer=init_worker, initargs=(os.getpid(),)
            )
        )
        pings = [pool.submit(os.getpid) for _ in range(workers)]  # start the workers in the background
        while queue and not any(p.done() for p in pings):  # meanwhile the parent works itself
            outcome = process(queue.pop())
            bar.advance(1)
            yield outcome
        pending: set[Future] = set()
        try:
            while queue or pending:
                while queue and len(pending) < 2 * workers:
                    pending.add(pool.submit(process, queue.pop()))
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    bar.advance(1)
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()


def pool_context() -> multiprocessing.context.BaseContext:
    """A forkserver that imported the readers and MONAI once (forking a threaded torch process can
    deadlock, and spawning re-imports torch in every worker); spawn where forkserver does not exist."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["medctl.data.preprocess", "medctl.data.transforms", "monai.transforms"])
    return context


def init_worker(parent_pid: int) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ["MEDCTL_NO_PROGRESS"] = "1"
    _die_with(parent_pid)


def _die_with(parent_pid: int) -> None:
    """End this worker when ``parent_pid`` (the medctl process) dies, even by SIGKILL: the kernel's
    parent-death signal where Linux offers it (our parent is the forkserver, which exits with medctl),
    and a thread that checks on medctl every half second everywhere."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    threading.Thread(
        target=_watch_parent, args=(parent_pid,), daemon=True, name="medctl-parent-watch"
    ).start()


def _watch_parent(parent_pid: int) -> None:
    while process_alive(parent_pid):
        time.sleep(0.5)
    os._exit(1)
