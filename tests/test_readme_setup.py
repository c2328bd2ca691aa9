"""The README's set-up: exactly two commands (the demo, the tests), the second what .ci/run runs, both
installing the CPU build of torch; and the random-weights quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_exactly_two_set_up_commands_and_ci_runs_the_second():
    section = _section("Set-up on a fresh machine")
    blocks = re.findall(r"```bash\n(.*?)```", section.split("### ")[0], re.S)
    assert len(blocks) == 2, blocks
    demo, tests = (b.strip() for b in blocks)
    assert "\n" not in demo and "\n" not in tests
    assert demo.endswith("&& dps-fast demo") and tests.endswith("&& python -m pytest tests -q")
    assert all(c.startswith(f"pip install torch==2.13.0 {CPU_INDEX} && ") for c in (demo, tests))
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == tests, "the README's test command and .ci/run's differ"
    assert "virtual environment" in section


@pytest.mark.usefixtures("one_thread")
def test_the_random_weights_quick_start_runs_as_written():
    quick = _section("Quick start")
    block = quick.split("No checkpoint or GPU at hand?")[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    env: dict = {}
    torch.manual_seed(0)
    exec("import torch\nfrom dps_fast import DPS, NoiseSchedule, operators\nfrom dps_fast.models import ADMUNet\n"
         + code, env)
    res = env["res"]
    assert tuple(res.samples.shape) == (2, 2, 3, 32, 32) and bool(torch.isfinite(res.samples).all())
