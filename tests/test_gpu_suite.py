"""bench/gpu_suite.sh on the CPU (DRY_RUN=1): the plumbing of the one prepared GPU run, and the
size of its GPU test subset.

One dry run (about a minute on 2 cores: nine Python processes, as on the GPU) checks that every
phase runs in order with a status, results reach bench/results and $OUT after each phase, the
smoke checks print PASS lines, the report carries the headline, the junit file is written, later
phases run with DPS_FAST_BUILD_CUDA=0 after a failed build, and the marked GPU subset compiles at
most ~40 Triton kernel specializations (counted under the interpreter by tests/_triton_count.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"
PHASES = ["env", "smoke", "headline", "build", "smoke_cuda", "kernels", "max_batch", "reconstruct", "gpu_tests",
          "total"]
#: Triton specializations the GPU subset may compile: each costs ~0.5-1 s (compile + launcher) on a
#: fresh GPU machine, and the test phase has ~60 s, an inductor compile included.
SPECIALIZATION_CAP = 40


def test_every_timeout_has_a_kill_delay():
    lines = [ln for ln in SUITE.read_text().splitlines() if re.search(r"\btimeout\s+-", ln) or re.search(r"\btimeout\s+\"?\$", ln)]
    assert lines, "the suite runs no timeout"
    for ln in lines:
        assert " -k " in ln, ln


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_suite")
    out, res = tmp / "out", tmp / "res"
    env = dict(os.environ, DRY_RUN="1", OUT=str(out), RESULTS_DIR=str(res), PYTHON=sys.executable)
    env.pop("DPS_FAST_BUILD_CUDA", None)
    proc = subprocess.run(["bash", str(SUITE)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, out, res


def test_dry_run_runs_every_phase_and_reports(dry_run):
    proc, out, res = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = dict(line.split("=", 1) for line in (res / "status.txt").read_text().splitlines())
    assert list(status) == PHASES
    for phase in PHASES:
        if phase not in ("build", "total"):
            assert status[phase].startswith("ok"), (phase, status[phase])
    assert status["build"].startswith("not built (dry run)")
    # $OUT holds the report and logs (at most 8 files: what the GPU machine sends back)
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["report.md", "report.json", "bench.jsonl", "smoke.txt", "suite.log", "build.log",
                            "tests.xml"]) and len(files) <= 8
    smoke = (out / "smoke.txt").read_text().splitlines()
    assert any(s.startswith("PASS triton dps_update") for s in smoke)
    assert any(s.startswith("PASS step tiny32") for s in smoke)
    assert not any(s.startswith("FAIL") for s in smoke)
    report = json.loads((out / "report.json").read_text())
    assert report["status"]["headline"].startswith("ok")
    head = report["headline"]
    assert head["best_ours_images_per_s"] > 0 and head["speedup_vs_original_best"] > 0
    assert "## Headline" in (out / "report.md").read_text()
    names = [r["name"] for r in report["benchmarks"]]
    assert any(n.startswith("test_step[eager") for n in names) and "test_headline" in names
    assert any(n.startswith("test_cpu_images_per_s_vs_batch") for n in names)
    ET.parse(out / "tests.xml")  # junit written (and well-formed)
    log = (out / "suite.log").read_text()
    after_build = log[log.index("== build:"):]
    assert "DPS_FAST_BUILD_CUDA=0" in after_build and "DPS_FAST_BUILD_CUDA=1" not in after_build


def test_gpu_subset_compiles_at_most_40_triton_specializations(dry_run):
    _, out, res = dry_run
    count = json.loads((res / "triton_specializations.json").read_text())
    junit = ET.parse(out / "tests.xml").getroot()
    suite = junit if junit.tag == "testsuite" else junit.find("testsuite")
    ran = int(suite.get("tests")) - int(suite.get("skipped"))
    assert ran >= 8 and int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0
    assert count["exitstatus"] == 0
    # the count is real: the update, prep and blur kernels were all launched
    assert {"_dps_update_kernel", "_spectral_kernel"} <= set(count["kernels"]), sorted(count["kernels"])
    assert 0 < count["total"] <= SPECIALIZATION_CAP, json.dumps(count["kernels"], indent=1)[:4000]
