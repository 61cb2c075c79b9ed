"""The resumable task runner (`pdl.sweep`): resume after a kill, failures, back-ends, workers that live across tasks."""
import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pdl.core import PdlError
from pdl.sweep import read_result, read_results, result_path, run_tasks, worker_start_method


@dataclass(frozen=True)
class Square:
    n: int

    @property
    def key(self) -> str:
        return f"sq{self.n}"


def square(task: Square) -> dict:
    """Module level, so spawned worker processes and Ray can import it; logs each call when SWEEP_LOG is set."""
    if log := os.environ.get("SWEEP_LOG"):
        with open(log, "a") as f:
            f.write(f"{task.n}\n")
    if task.n == 13:
        raise ValueError("thirteen is unlucky")
    return {"n": task.n, "square": task.n * task.n, "pid": os.getpid()}


@functools.lru_cache(maxsize=None)
def _load(dataset: int) -> int:
    """A per-process cache like `pdl.apr.load_variant`: each real load is logged as `<pid> <dataset>`."""
    with open(os.environ["SWEEP_LOG"], "a") as f:
        f.write(f"{os.getpid()} {dataset}\n")
    return dataset


DRIVER_STATE: list = []      # filled by the test in the driver: a forked worker sees it, a spawned one does not


def square_from_cache(task: Square) -> dict:
    return {"n": task.n, "dataset": _load(task.n % 3), "pid": os.getpid(), "forked": bool(DRIVER_STATE)}


def note_worker(log: str) -> None:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")


def interrupt_or_sleep(task: Square) -> dict:
    if task.n == 1:
        time.sleep(0.5)
        raise KeyboardInterrupt      # Ctrl-C in a worker while task 0 still runs
    time.sleep(60 if task.n == 0 else 0)
    return {"n": task.n}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("PDL_PROGRESS", "0")


def _calls(log):
    return [int(line) for line in log.read_text().split()] if log.exists() else []


@pytest.mark.parametrize("backend", ["serial", "process"])
def test_resumes_after_a_kill_without_recomputing_or_duplicating(tmp_path, monkeypatch, backend):
    log = tmp_path / "calls.log"
    monkeypatch.setenv("SWEEP_LOG", str(log))
    work = tmp_path / "work"
    tasks = [Square(n) for n in range(6)]
    workers = 1 if backend == "serial" else 2
    first = run_tasks(tasks, square, work, backend=backend, workers=workers, limit=2)     # "killed" after 2 results
    assert (first.trained, first.remaining, first.backend) == (2, 4, backend)
    (work / ".sq5.json.abc.tmp").write_text("{")          # debris of a write killed half-way
    (work / "sq4.json").write_text('{"key": "sq4", "res')   # a torn file from before atomic writes: not a result
    done = {t.n for t in tasks if read_result(t, work) is not None}
    assert len(done) == 2 and len(_calls(log)) == 2
    second = run_tasks(tasks, square, work, backend=backend, workers=workers)
    assert (second.done_before, second.trained, second.remaining) == (2, 4, 0)
    assert sorted(_calls(log)) == list(range(6))           # every task computed exactly once over both runs
    assert run_tasks(tasks, square, work, backend=backend, workers=workers).trained == 0
    assert len(_calls(log)) == 6
    assert [r["square"] for r in read_results(tasks, work)] == [n * n for n in range(6)]
    assert not list(work.glob(".*.tmp"))
    if backend == "process":
        assert all(r["pid"] != os.getpid() for r in read_results(tasks, work))


@pytest.mark.parametrize("backend", ["serial", "process"])
def test_a_failing_task_is_reported_and_finished_tasks_are_kept(tmp_path, backend):
    tasks = [Square(n) for n in (1, 2, 13, 3)]
    workers = 1 if backend == "serial" else 2
    with pytest.raises(PdlError, match="task sq13 failed.*thirteen is unlucky"):
        run_tasks(tasks, square, tmp_path, backend=backend, workers=workers)
    assert read_result(Square(1), tmp_path)["square"] == 1 and read_result(Square(2), tmp_path)["square"] == 4
    assert read_result(Square(13), tmp_path) is None
    after = run_tasks([t for t in tasks if t.n != 13], square, tmp_path, backend=backend, workers=workers)
    assert after.done_before >= 2 and after.remaining == 0


def test_an_interrupt_keeps_what_finished(tmp_path):
    calls, interrupted = [], []

    def interrupted_on_the_third(task):
        calls.append(task.n)
        if len(calls) == 3 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt      # Ctrl-C while the third task runs: not wrapped, not stored
        return square(task)

    tasks = [Square(n) for n in range(5)]
    with pytest.raises(KeyboardInterrupt):
        run_tasks(tasks, interrupted_on_the_third, tmp_path)
    assert [r["n"] for r in read_results(tasks, tmp_path)] == [0, 1]
    calls.clear()
    assert run_tasks(tasks, interrupted_on_the_third, tmp_path).trained == 3 and calls == [2, 3, 4]


def test_a_result_file_of_another_task_is_not_served(tmp_path):
    path = result_path(Square(2), tmp_path)
    path.write_text(json.dumps({"key": "other", "result": 99}))
    assert read_result(Square(2), tmp_path) is None
    assert run_tasks([Square(2)], square, tmp_path).trained == 1
    assert read_result(Square(2), tmp_path)["square"] == 4


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(PdlError, match="unknown backend"):
        run_tasks([], square, tmp_path, backend="mpi")
    with pytest.raises(PdlError, match="duplicate tasks"):
        run_tasks([Square(1), Square(1)], square, tmp_path)
    with pytest.raises(PdlError, match="bad task key"):
        result_path(type("Task", (), {"key": "../x"})(), tmp_path)


RAY_CHILD = r"""
import json, sys
from test_sweep import Square, square
from pdl.sweep import read_results, run_tasks
tasks = [Square(n) for n in range(4)]
first = run_tasks(tasks, square, sys.argv[1], backend="ray", workers=2)
again = run_tasks(tasks, square, sys.argv[1], backend="ray", workers=2)
print(json.dumps({"backend": first.backend, "squares": [r["square"] for r in read_results(tasks, sys.argv[1])],
                  "retrained": again.trained}))
"""


@pytest.mark.slow
def test_ray_backend_in_local_mode(tmp_path):
    """In a child process: a local Ray instance starts threads and processes that must not share the test process
    with everything the other tests imported (a Ray failure there would take the whole test run down)."""
    pytest.importorskip("ray")
    # Ray workers import `square` from this file: let the local Ray instance they are started by see it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", RAY_CHILD, str(tmp_path)], capture_output=True, text=True, env=env,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["backend"] in ("ray", "process")     # a local Ray that cannot start falls back to processes
    assert report["squares"] == [0, 1, 4, 9] and report["retrained"] == 0


@pytest.mark.parametrize("threads", [1, 2])      # 1: forked workers, 2: spawned workers (see pdl.sweep.worker_start_method)
def test_workers_live_across_tasks_and_keep_their_caches(tmp_path, monkeypatch, threads):
    loads, started = tmp_path / "loads.log", tmp_path / "workers.log"
    monkeypatch.setenv("SWEEP_LOG", str(loads))
    monkeypatch.setattr(sys.modules[__name__], "DRIVER_STATE", ["driver"])
    tasks = [Square(n) for n in range(12)]
    summary = run_tasks(tasks, square_from_cache, tmp_path / "work", backend="process", workers=2,
                        threads_per_worker=threads, initializer=functools.partial(note_worker, str(started)))
    results = read_results(tasks, tmp_path / "work")
    assert summary.trained == 12 and [r["dataset"] for r in results] == [n % 3 for n in range(12)]
    pids = {r["pid"] for r in results}
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids          # 12 tasks, at most 2 processes
    assert {r["forked"] for r in results} == {worker_start_method(threads) == "fork"}
    load_lines = loads.read_text().splitlines()
    assert len(load_lines) == len(set(load_lines)) <= 2 * 3          # each worker loads each dataset at most once
    assert sorted(map(int, started.read_text().split())) == sorted(pids)   # the initializer ran once per worker


def test_serial_backend_runs_the_initializer_once_in_this_process(tmp_path):
    started = tmp_path / "workers.log"
    run_tasks([Square(n) for n in range(3)], square, tmp_path, initializer=functools.partial(note_worker, str(started)))
    assert started.read_text().split() == [str(os.getpid())]


def test_an_interrupt_in_a_worker_stops_the_run_at_once(tmp_path):
    psutil = pytest.importorskip("psutil")
    tasks = [Square(n) for n in range(4)]
    before = {p.pid for p in psutil.Process().children()}   # e.g. a forkserver an earlier test left running
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        run_tasks(tasks, interrupt_or_sleep, tmp_path, backend="process", workers=2)
    assert time.perf_counter() - started < 30            # the worker sleeping 60 s was terminated, not awaited
    assert read_results(tasks, tmp_path) == []
    def workers():       # child processes this run started, other than multiprocessing's resource tracker
        return [p for p in psutil.Process().children()
                if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline())]

    psutil.wait_procs(workers(), timeout=10)
    assert not [p for p in workers() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_workers_are_forked_only_where_that_is_safe():
    import torch
    linux_cpu = sys.platform.startswith("linux") and not torch.cuda.is_initialized()
    assert worker_start_method(1) == ("fork" if linux_cpu else "spawn")
    assert worker_start_method(2) == "spawn"          # OpenMP's thread pool does not survive a fork
