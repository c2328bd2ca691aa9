"""The docstring examples of the methods run and print what they claim."""

import doctest
import importlib

import pytest

MODULES = ["dps_fast.methods.svd", "dps_fast.methods.mcg", "dps_fast.methods.pigdm", "dps_fast.methods.ddrm",
           "dps_fast.methods.registry", "dps_fast.engine"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, extraglobs={"torch": importlib.import_module("torch")}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0, f"{name} has no example"


def test_readme_method_list_is_the_registry():
    """The README lists the methods from dps_fast.methods.registry (markdown_table), not by hand."""
    from pathlib import Path

    from dps_fast.methods.registry import METHODS, markdown_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("<!-- methods:begin -->\n", 1)[1].split("\n<!-- methods:end -->", 1)[0]
    assert block == markdown_table()
    assert all(f"| `{key}` |" in block for key in METHODS)
