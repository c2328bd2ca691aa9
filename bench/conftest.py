"""Benchmark session set-up.

* The repository root on ``sys.path`` (bench imports tests/nets.py; dps_fast need not be
  installed: run from a checkout with ``PYTHONPATH=.``).
* Every finished benchmark is appended at once to ``$DPS_BENCH_JSONL`` (one JSON line each), so a
  suite cut short by its time limit still reports every case that completed (pytest-benchmark's
  own ``--benchmark-json`` is written only at the end of a session).
* A terminal summary lists each case's ratios (speed-ups, overheads with their confidence
  intervals, % of copy bandwidth or of the matmul rate, images/s): pytest-benchmark's own table
  shows only absolute times, which on a shared CPU are noise.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

# On the 2-core CPU machines here, two OpenMP threads make a step's time depend on the scheduler
# (reference vs torch backend swung between 0.94x and 1.10x run to run); one thread measures the
# work itself. DPS_BENCH_THREADS overrides it; every CPU result records the thread count.
if not torch.cuda.is_available():
    torch.set_num_threads(int(os.environ.get("DPS_BENCH_THREADS", "1")))

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from report import RATIO_WORDS, _fmt  # noqa: E402 - bench/ (this folder) is on sys.path

#: extra_info keys the terminal summary prints, when a case has them (ratios and derived rates)
SUMMARY_KEYS = (
    "speedup_torch_vs_reference", "speedup_vs_original", "speedup_vs_torch", "speedup_vs_four_ffts",
    "ratio_to_two_bare_ffts", "pct_of_copy", "overhead_over_floor_pct", "overhead_ci95_pct",
    "images_per_s", "seconds_per_image_1000_steps", "tflops", "pct_of_bf16_matmul", "speedup_vs_batch1",
    "auto_vs_best_fixed", "max_batch_ours", "max_batch_original", "max_batch_ratio", "bf16_matmul_tflops",
    # test_step.py::test_headline
    "best_ours", "best_ours_images_per_s", "best_original", "best_original_images_per_s",
    "speedup_vs_original_best", "meets_target", "best_ours_pct_of_bf16_matmul",
)


def _summary_keys(info: dict) -> list[str]:
    # any other scalar extra_info key naming a ratio (report.RATIO_WORDS) is printed after those (the
    # suites of the operators, methods, fidelity and dps2022 name theirs e.g. ratio_vs_circular, sw2_over_floor)
    extra = [k for k in info if k not in SUMMARY_KEYS and any(w in k for w in RATIO_WORDS)
             and isinstance(info[k], (int, float)) and not isinstance(info[k], bool)]
    return [k for k in SUMMARY_KEYS if info.get(k) is not None] + extra
_ROWS = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_ROWS] = []


@pytest.fixture(autouse=True)
def _stream_result(request: pytest.FixtureRequest):
    yield
    bm = request.node.funcargs.get("benchmark") if hasattr(request.node, "funcargs") else None
    stats = getattr(bm, "stats", None)
    if stats is None:
        return
    rec = {"name": request.node.nodeid.split("::", 1)[-1], "file": request.node.nodeid.split("::", 1)[0],
           "median_s": stats.stats.median, "extra_info": dict(bm.extra_info)}
    request.config.stash[_ROWS].append(rec)
    path = os.environ.get("DPS_BENCH_JSONL")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    rows = config.stash.get(_ROWS, [])
    if not rows:
        return
    terminalreporter.section("dps_fast ratios (extra_info; absolute times above are for reference only)")
    for r in rows:
        info = r["extra_info"]
        parts = [f"{k}={_fmt(info[k])}" for k in _summary_keys(info)]
        terminalreporter.write_line(f"{r['name']}: " + (", ".join(parts) if parts else "(no ratio recorded)"))
