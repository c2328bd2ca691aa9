"""The docstring examples of the public modules run and print what they claim."""

import doctest
import importlib

import pytest

MODULES = ["dps_fast.schedule", "dps_fast.noise", "dps_fast.sampler", "dps_fast.operators.blur",
           "dps_fast.operators.base", "dps_fast.operators.poisson", "dps_fast.operators.phase",
           "dps_fast.operators.differentiable",
           "dps_fast.operators.masks", "dps_fast.operators.matrix", "dps_fast.operators.superres",
           "dps_fast.priors.gaussian", "dps_fast.priors.mixture", "dps_fast.divergence", "dps_fast.problems",
           "dps_fast.distances",
           "dps_fast.explore", "dps_fast.models.adm", "dps_fast.cli_options", "dps_fast.reconstruct.manifest",
           "dps_fast.reconstruct.items"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, extraglobs={"torch": importlib.import_module("torch")}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0, f"{name} has no example"
