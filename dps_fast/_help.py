"""Shared pieces of the ``dps-fast`` sub-commands' argument parsers (help layout, value types)."""

from __future__ import annotations

import argparse
import math

__all__ = ["HelpFormatter", "non_negative_float", "positive_float", "positive_int", "batch_size", "EXIT_CODES"]

#: Documented in ``dps-fast --help`` and the README.
EXIT_CODES = """exit codes:
  0    done
  1    a chain diverged (NaN/inf or runaway growth; the message names the step): try a smaller --zeta
  2    usage or input error (bad option, missing or unreadable file, --out is a file, ...)
  3    unexpected internal error: one line; re-run with -v for the traceback
  130  interrupted (Ctrl-C); dps-fast reconstruct resumes when the same command is re-run"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions/epilogs as written and appends "(default: X)" to an option's help only
    where it says something: not when the help already names the default, the option is
    required, or the default is None/False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.required or not action.option_strings
                or action.default is None or action.default is False or action.default == argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def _number(kind: type, test, expected: str):
    def parse(value: str):
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
        if not (math.isfinite(v) and test(v)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
        return v

    parse.__name__ = expected  # argparse names the type in its messages
    return parse


non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")


def batch_size(value: str) -> "int | str":
    """``--batch-size``: ``auto`` or a positive integer."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {value!r}")
    return n
