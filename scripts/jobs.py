"""Run a benchmark's jobs as subprocesses of its own module, a few side by side with one thread each (two on the
2-core development machine), each after the jobs it needs: the scheduler of compare_recipes and bench_synth."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORTING_OPTIONS = ("--table", "--plot", "--results-block", "--collect")


@dataclass
class Job:
    """One subprocess: `python -m <module> <shared args> <args>`, logged to `<out>/<name>.log`."""

    name: str
    args: list[str]
    needs: set[str] = field(default_factory=set)


def without_reporting(argv: list[str]) -> list[str]:
    """The command line minus --table/--plot and their values (jobs train and evaluate; they do not report)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in REPORTING_OPTIONS:
            skip = True
        elif not item.startswith(tuple(option + "=" for option in REPORTING_OPTIONS)):
            kept.append(item)
    return kept


def run_jobs(module: str, jobs: list[Job], shared_args: list[str], parallel: int, out: Path,
             threads: int = 1) -> set[str]:
    """Run every job, `parallel` at a time with `threads` threads each; a job whose need failed is skipped and counts
    as failed. Returns the names of the jobs that failed (each also named on stderr with its log)."""
    waiting = list(jobs)
    running: dict[str, subprocess.Popen] = {}
    failed: set[str] = set()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    while waiting or running:
        unfinished = {job.name for job in waiting} | set(running)
        for job in list(waiting):
            if job.needs & failed:
                waiting.remove(job)
                failed.add(job.name)
            elif len(running) < parallel and not job.needs & unfinished:
                waiting.remove(job)
                with open(out / f"{job.name}.log", "a") as log:  # the child keeps its own handle
                    running[job.name] = subprocess.Popen([sys.executable, "-m", module, *shared_args, *job.args],
                                                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(5)
        for name, process in list(running.items()):
            if process.poll() is not None:
                del running[name]
                if process.returncode:
                    failed.add(name)
                    print(f"job {name} failed (see {out / (name + '.log')})", file=sys.stderr)
    return failed
