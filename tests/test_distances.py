"""dps_fast.distances: the one sliced W2 that the demo, explore and fidelity score with."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dps_fast.distances import SlicedReference, sliced_w2
from tests.test_ground_truth import sliced_wasserstein


def test_sliced_w2_against_a_direct_computation():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(300, 5, generator=g, dtype=torch.float64)
    b = torch.randn(300, 5, generator=g, dtype=torch.float64) * 1.3 + 0.2
    assert sliced_w2(a, b, 64, seed=1) == pytest.approx(sliced_wasserstein(a, b, 64, seed=1), rel=1e-12)
    # unequal sizes: b's projections at a's quantile levels, one direction at a time in numpy
    c = b[:170]
    dirs = torch.randn(5, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    dirs = (dirs / dirs.norm(dim=0, keepdim=True)).numpy()
    levels = (np.arange(300) + 0.5) / 300
    per_dir = [np.mean((np.sort(a.numpy() @ u) - np.quantile(c.numpy() @ u, levels)) ** 2) for u in dirs.T]
    assert sliced_w2(a, c, 16, seed=4) == pytest.approx(math.sqrt(np.mean(per_dir)), rel=1e-12)


def test_a_sorted_reference_gives_the_same_distance():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(200, 3, generator=g, dtype=torch.float64)
    b = torch.randn(700, 3, generator=g, dtype=torch.float64) + 0.3
    ref = SlicedReference(b, 32, seed=7)
    assert sliced_w2(a, ref) == sliced_w2(a, b, 32, seed=7)
    assert sliced_w2(a.float(), ref) == pytest.approx(sliced_w2(a, ref), rel=1e-6)  # float32 input is promoted


@pytest.mark.parametrize("a_shape, b_shape, match", [
    ((10, 5), (10, 3), "same d"), ((10,), (10, 1), "a: expected a point cloud"),
    ((10, 2), (0, 2), "b: expected a point cloud"), ((10, 2, 1), (10, 2), "a: expected"),
])
def test_bad_point_clouds_are_named(a_shape, b_shape, match):
    with pytest.raises(ValueError, match=match):
        sliced_w2(torch.zeros(a_shape), torch.zeros(b_shape))


def test_one_sliced_w2_and_fidelity_imports_no_command_module():
    import ast
    from pathlib import Path

    import dps_fast

    root = Path(dps_fast.__file__).parent
    commands = {"demo", "explore", "cli", "fidelity_cli"}
    tree = ast.parse((root / "fidelity.py").read_text())
    imported = {(node.module or "").lstrip(".") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & commands, imported & commands
    assert not any(m.endswith(".cli") for m in imported), imported
    defining = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if "def sliced_w2(" in p.read_text())
    assert defining == ["distances.py"]
