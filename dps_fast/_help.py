"""Shared pieces of the ``dps-fast`` sub-commands' argument parsers (help layout, value types)."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import NoReturn, Sequence

__all__ = ["HelpFormatter", "OneLineErrorParser", "non_negative_float", "positive_float", "positive_int",
           "int_at_least", "batch_size", "device_option", "check_out_file", "check_out_dir", "os_error_message",
           "count", "EXIT_CODES"]

#: Documented in ``dps-fast --help`` and the README.
EXIT_CODES = """exit codes:
  0    done
  1    a chain diverged (NaN/inf or runaway growth; the message names the step): try a smaller --zeta
  2    usage or input error (bad option, missing or unreadable file, --out is a file, ...)
  3    unexpected internal error: one line; re-run with -v for the traceback
  4    dps-fast reconstruct: nothing was reconstructed (every input skipped, or none found)
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


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (exit 2), as ``dps-fast --help`` and the README
    promise, with a pointer to ``--help`` instead of the usage block. Sub-command parsers made by
    ``add_subparsers()`` inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


non_negative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")


def int_at_least(low: int):
    """An argparse type: an integer >= ``low`` (e.g. 2 for a sample count that a standard deviation needs)."""
    return _number(int, lambda v: v >= low, f"an integer >= {low}")


def device_option(value: str) -> str:
    """``--device`` of reconstruct and explore: a device torch knows (cpu, cuda, cuda:1, ...), and CUDA only
    where this torch has it; checked when the command line is read, so both commands refuse it alike."""
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {value!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r} requested but CUDA is not available (torch {torch.__version__})")
    return value


def check_out_file(path: "str | os.PathLike[str]", flag: str = "--out", suffixes: Sequence[str] = ()) -> Path:
    """Check, before any work, that ``path`` can be written as a file: not a folder, a name ending in one
    of ``suffixes`` (when given), and a folder that exists or can be made and takes a new file. Creates
    the folder; raises ValueError naming ``flag`` (the caller's option), never a bare OS error."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{flag}: {str(out)!r} is a folder; expected a file path"
                         + (f" ending in {' or '.join(suffixes)}" if suffixes else ""))
    if suffixes and out.suffix.lower() not in suffixes:
        raise ValueError(f"{flag}: expected a file name ending in {' or '.join(suffixes)}, got {str(out)!r}")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"{flag}: cannot write {str(out)!r}: {str(parent)!r} is a file, not a folder") from None
    except OSError as exc:
        raise ValueError(f"{flag}: cannot create the folder {str(parent)!r}: {exc.strerror or exc}") from None
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise ValueError(f"{flag}: cannot write into the folder {str(parent)!r}: {exc.strerror or exc}") from None
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"{flag}: {str(out)!r} exists and is not writable")
    return out


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


def check_out_dir(path: "str | os.PathLike[str]", flag: str = "--out") -> Path:
    """Check, before any work, that ``path`` is a folder that exists or can be made and takes new files
    (it is made here); raises ValueError naming ``flag``, never a bare OS error."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag}: {str(out)!r} is a file; expected a folder (created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{flag}: cannot create the folder {str(out)!r}: {exc.strerror or exc}") from None
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ValueError(f"{flag}: cannot write into the folder {str(out)!r}: {exc.strerror or exc}") from None
    return out


def os_error_message(exc: OSError, options: "dict[str, object]", argv: Sequence[str] = ()) -> str:
    """One line for an OS error of a command: the option whose path holds ``exc.filename``, that
    path and the reason, without the name of a file the command made inside it (a temporary file,
    say). ``options`` maps option names to their values (``vars(args)``); ``argv`` is the command line,
    from which the option's spelling is taken ("--save_dir" stays so)."""
    reason = exc.strerror or str(exc)
    if not exc.filename:
        return str(exc)
    target = Path(os.fsdecode(exc.filename)).absolute()
    best: "tuple[int, str, str] | None" = None
    for dest, value in options.items():
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            continue
        p = Path(os.fspath(value)).absolute()
        # the path itself, a file inside it (a folder option), or the ".NAME..." temporary file of
        # an atomic write beside it (a file option)
        beside = target.parent == p.parent and target.name.startswith("." + p.name)
        if (p == target or p in target.parents or beside) and (best is None or len(p.parts) > best[0]):
            best = (len(p.parts), dest, os.fspath(value))
    if best is None:
        return f"{reason}: {os.fsdecode(exc.filename)!r}"
    _, dest, value = best
    argv = list(argv)
    flag = next((argv[k - 1] for k in range(1, len(argv)) if argv[k] == value and argv[k - 1].startswith("-")), None)
    flag = flag or next((a.split("=", 1)[0] for a in argv if a.startswith("-") and a.endswith("=" + value)), None)
    flag = flag or ("--" + dest.replace("_", "-"))
    return f"{flag}: {value!r}: {reason}"


def count(n: int, noun: str, plural: "str | None" = None) -> str:
    """``n`` and ``noun`` agreeing in number: ``count(1, "input")`` is "1 input", ``count(3, "input")``
    "3 inputs" (``plural`` for nouns that do not just add an s)."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
