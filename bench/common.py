"""Helpers every bench script shares: pinned child processes, their peak RSS, JSON result lines.

A bench measures each engine in its own child process, one after another, pinned to the same
cores with the same thread count, so that engines do not disturb each other and the peak RSS of a
child is the memory of one model on one engine. Children report their figures as the last line
of stdout, a single JSON object; a bench itself ends with one JSON line of its headline figures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POLL_S = 0.05
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class BenchError(RuntimeError):
    """A bench could not run as asked (bad arguments, a child that failed or printed no result)."""


@dataclass(frozen=True)
class ChildResult:
    """What a finished child process left: exit status, output, its own peak RSS and wall time."""

    returncode: int
    stdout: str
    stderr: str
    peak_rss_mb: float
    wall_s: float
    timed_out: bool

    def last_json(self) -> dict[str, Any]:
        """The child's result line; a clear error when it failed or printed none."""
        if self.timed_out:
            raise BenchError(f"child timed out after {self.wall_s:.0f} s; {self.stderr_tail()}")
        if self.returncode != 0:
            how = (
                f"was killed by signal {-self.returncode}"
                if self.returncode < 0
                else f"exited with status {self.returncode}"
            )
            raise BenchError(f"child {how}; {self.stderr_tail()}")
        return last_json_line(self.stdout)

    def stderr_tail(self, lines: int = 3) -> str:
        tail = [line for line in self.stderr.strip().splitlines() if line.strip()][-lines:]
        return "stderr: " + (" | ".join(tail) if tail else "(empty)")


def available_cores() -> tuple[int, ...]:
    """Cores this process may run on, in order."""
    return tuple(sorted(os.sched_getaffinity(0)))


def pick_cores(count: int, cores: Sequence[int] | None = None) -> tuple[int, ...]:
    """The first `count` allowed cores (every child of a bench gets the same ones)."""
    allowed = tuple(cores) if cores is not None else available_cores()
    if count < 1:
        raise BenchError(f"thread count must be at least 1, got {count}")
    if count > len(allowed):
        raise BenchError(
            f"{count} threads asked for, but only {len(allowed)} cores are available "
            f"({', '.join(map(str, allowed))})"
        )
    return allowed[:count]


def pinned_command(command: Sequence[str], cores: Sequence[int]) -> list[str]:
    """`command` run under `taskset` on `cores` (unpinned when taskset is not installed)."""
    taskset = shutil.which("taskset")
    if taskset is None:
        return list(command)
    return [taskset, "-c", ",".join(map(str, cores)), *command]


def thread_env(threads: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment that caps OpenMP/MKL/OpenBLAS pools at `threads`."""
    env = dict(os.environ if base is None else base)
    env.update({name: str(threads) for name in THREAD_ENV_VARS})
    return env


def python_module_command(module: str, args: Sequence[str]) -> list[str]:
    """`python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def run_child(
    command: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout_s: float = 600.0,
    cwd: Path | None = None,
    echo_stderr: bool = False,
) -> ChildResult:
    """Run a child to completion and collect its output and its peak RSS.

    The peak is the child's VmHWM, polled while it runs (rusage's ru_maxrss would not do: Linux
    carries the parent's high-water mark over fork and exec, so every child would seem at least
    as big as the parent). Output goes to temporary files, not pipes, so a chatty child never
    blocks; stderr is copied to ours afterwards when `echo_stderr`. A child past `timeout_s` is
    killed.
    """
    with (
        tempfile.TemporaryFile(mode="w+") as out,
        tempfile.TemporaryFile(mode="w+") as err,
    ):
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(command), stdout=out, stderr=err, env=None if env is None else dict(env), cwd=cwd
        )
        peak, timed_out = _wait_watching_rss(proc, timeout_s)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if echo_stderr and stderr:
        sys.stderr.write(stderr)
    assert proc.returncode is not None
    return ChildResult(
        returncode=proc.returncode,
        stdout=stdout,
        stderr=stderr,
        peak_rss_mb=peak,
        wall_s=wall,
        timed_out=timed_out,
    )


def _wait_watching_rss(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[float, bool]:
    peak = 0.0
    for _ in range(int(timeout_s / POLL_S) + 1):
        peak = max(peak, vm_hwm_mb(proc.pid) or 0.0)
        try:
            proc.wait(timeout=POLL_S)
            return peak, False
        except subprocess.TimeoutExpired:
            continue
    proc.kill()
    proc.wait()
    return peak, True


def vm_hwm_mb(pid: int | str = "self") -> float | None:
    """Peak resident set size (VmHWM) of a live process in MB (MiB); None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (VmHWM since its exec), in MB (MiB)."""
    return vm_hwm_mb() or 0.0


def json_line(payload: Mapping[str, Any]) -> str:
    """One compact JSON line (the last line a bench or a bench child prints)."""
    return json.dumps(payload, separators=(", ", ": "), allow_nan=False)


def last_json_line(text: str) -> dict[str, Any]:
    """The JSON object on the last non-empty line of `text`."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        raise BenchError("no output: expected a JSON line last")
    try:
        payload = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise BenchError(f"last line is not JSON ({exc}): {lines[-1][:200]!r}") from None
    if not isinstance(payload, dict):
        raise BenchError(f"last line is JSON but not an object: {lines[-1][:200]!r}")
    return payload


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    """numerator / denominator rounded, or None when either side is missing or zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, digits)
