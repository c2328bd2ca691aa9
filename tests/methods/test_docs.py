"""The docstring examples of the methods run and print what they claim."""

import doctest
import importlib

import pytest

MODULES = ["dps_fast.methods.svd", "dps_fast.methods.mcg", "dps_fast.methods.pigdm", "dps_fast.methods.ddrm"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, extraglobs={"torch": importlib.import_module("torch")}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0, f"{name} has no example"
