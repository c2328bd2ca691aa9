"""The ``dps-fast`` command. Each sub-command lives in its own module, which exposes
``add_parser(subparsers)`` (registering its options and ``func``); :func:`main` maps errors to
the documented exit codes (see ``EXIT_CODES`` in :mod:`dps_fast._help`).

Example:
    dps-fast demo
    torchrun --nproc-per-node N -m dps_fast.cli reconstruct ...
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Optional, Sequence

from ._help import EXIT_CODES, HelpFormatter, OneLineErrorParser, os_error_message

__all__ = ["main", "build_parser", "EXIT_DIVERGED", "EXIT_USAGE", "EXIT_INTERNAL"]

EXIT_DIVERGED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 130

DESCRIPTION = """Diffusion Posterior Sampling (DPS): a demo and an interactive explorer on a 1-D problem
whose exact posterior is known, and posterior sampling for image datasets.

examples:
  dps-fast demo                      1-D deblurring, three guidance scales -> demo_out/dps_demo.png
  dps-fast explore                   the same problem with a zeta slider -> demo_out/explore.html
  dps-fast explore --model tiny32 --random-weights --image face.png
                                     x0hat over t per zeta for an image (use --checkpoint for real weights)
  dps-fast reconstruct faces/ --out runs/blur --model ffhq256 --checkpoint ffhq_10m.pt --samples 4
  dps-fast reconstruct --help        where to get checkpoints, the outputs, resuming, torchrun"""

# Errors a user can fix: shown as one line, exit code 2. Anything else is an internal error (3).
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    from . import demo, explore, fidelity_cli
    from .compat.dps2022 import cli as compat_cli
    from .reconstruct import cli as reconstruct_cli

    parser = OneLineErrorParser(prog="dps-fast", description=DESCRIPTION, epilog=EXIT_CODES,
                                formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level and print the traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_parser(sub)
    explore.add_parser(sub)
    reconstruct_cli.add_parser(sub)
    fidelity_cli.add_parser(sub)
    compat_cli.add_parser(sub)
    for command in sub.choices.values():  # -v works after the sub-command too ("re-run with -v" says so)
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="as dps-fast -v: log at INFO level and print the traceback of any error")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``dps-fast``; returns the exit code (argparse itself exits 2 on a bad command line)."""
    from .divergence import NonFiniteError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad command line (2, message printed by argparse)
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    name = f"dps-fast {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NonFiniteError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"{name}: diverged: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except USER_ERRORS as exc:
        if args.verbose:
            traceback.print_exc()
        # an OS error names the option whose path failed, not a file the command made inside it
        message = (os_error_message(exc, vars(args), sys.argv[1:] if argv is None else argv)
                   if isinstance(exc, OSError) else str(exc))
        print(f"{name}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - the documented exit code 3, one line without -v
        if args.verbose:
            traceback.print_exc()
            print(f"{name}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        else:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(f"{name}: internal error: {type(exc).__name__}: {first} (re-run with -v for the traceback)",
                  file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
