"""Shared helpers for the benchmark scripts: clocks, interleaved best-of timing, baselines, tables, JSON.

Timing on shared CPUs: a wall clock measures everyone's load. By default the scripts run one intra-op thread and read
this process's CPU time (`time.process_time`), which counts only the work this process did; with one thread that is
also the honest cost of the computation. `--clock wall --threads N` measures elapsed time instead (use it on a quiet
machine). Candidates are timed round-robin and the minimum over repeats is kept, so slow phases of a noisy machine hit
every candidate alike and are then discarded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

try:
    import hybridzoo  # noqa: F401  (installed: the normal case)
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """`--quick`, `--threads`, `--clock`, `--repeats`, `--json`: the options every benchmark script shares."""
    parser.add_argument("--quick", action="store_true", help="smoke run (< 60 s): small sizes, one repeat")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads while timing (default 1)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: this process's CPU time (robust on a shared machine, default); wall: elapsed time",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (min is reported)")
    parser.add_argument("--json", type=str, default=None, help="also write the results to this path")


def timed(fn: Callable[[], object], clock: str = "cpu") -> float:
    """Seconds one call of `fn` takes on `clock`."""
    now = CLOCKS[clock]
    start = now()
    fn()
    return now() - start


def best_of(candidates: dict[str, Callable[[], object]], repeats: int, clock: str = "cpu") -> dict[str, float]:
    """Minimum seconds per candidate over `repeats` rounds; each round runs every candidate once (interleaved)."""
    best = {name: float("inf") for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            best[name] = min(best[name], timed(fn, clock))
    return best


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_of(fn: Callable[[], object]) -> int | None:
    """Bytes by which this process's peak resident memory rose above its resident memory at the start of `fn()`
    (activations, gradients, temporaries of one call; Linux only: resets the peak via /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_kib("VmRSS")
    except (OSError, RuntimeError):
        return None
    fn()
    return 1024 * (_status_kib("VmHWM") - before)


def load_average() -> str:
    """`uptime`'s three load averages: how busy the (possibly shared) machine was."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def machine_info(threads: int, clock: str) -> dict:
    """What the numbers were measured on: CPU model, core count, versions, threads, clock, date."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "clock": clock,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "load_average": load_average(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }


def print_header(title: str, info: dict) -> None:
    print(f"# {title}\n")
    print(
        f"{info['cpu']}, {info['cores']} cores, {info['threads']} intra-op thread(s), clock: {info['clock']}; "
        f"torch {info['torch']}, transformers {info['transformers']}; {info['date']}; "
        f"load average {info['load_average']} (1, 5, 15 min)\n"
    )


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """A markdown table: first column left-aligned (names), the others right-aligned (numbers)."""
    align = ["---" if i == 0 else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=str))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_intermediate_size(build: Callable[[int], nn.Module], target: int, layers: int, hidden: int) -> int:
    """The MLP width that gives `build(width)` (a model with `layers` gated MLPs of width `hidden`) `target` params.

    A gated MLP has 3 * hidden * width parameters, so one probe model fixes the rest of the count exactly.
    """
    probe = 64
    rest = count_parameters(build(probe)) - 3 * hidden * probe * layers
    return max(1, round((target - rest) / (3 * hidden * layers)))


def ratio_line(name: str, value: float, target: str, met: bool) -> str:
    """The closing `RATIO ...` line of a benchmark: one per target, naming the baseline."""
    return f"RATIO {name}: {value:.2f}x (target {target}: {'met' if met else 'MISSED'})"
