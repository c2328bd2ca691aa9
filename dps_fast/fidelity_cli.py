"""The ``fidelity`` sub-command of ``dps-fast``: :func:`add_parser` registers it, :func:`run`
executes it and returns the exit code (0 done, 2 bad settings).

Example:
    dps-fast fidelity                       # the default grid, ~3 min on 2 CPU cores -> fidelity_out/
    dps-fast fidelity --grid tiny --problems mixture-2d --methods DPS,DDRM --out /tmp/fid
"""

from __future__ import annotations

import argparse
from typing import Any

from ._help import HelpFormatter, check_out_dir

__all__ = ["add_parser", "run"]


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``fidelity`` on an ``add_subparsers()`` object (its ``func`` is :func:`run`)."""
    from .fidelity import GRIDS, METHODS, PROBLEMS

    p = subparsers.add_parser(
        "fidelity", help="DPS, MCG, PiGDM and DDRM against exact posteriors: a Markdown table and a plot",
        description="Runs every method over a grid of its hyperparameter and step count on four problems with\n"
                    "exact posteriors and scores each run (posterior mean and covariance errors, sliced W2 to\n"
                    "exact samples, mode weights, NFE, seconds per sample) beside the floor of exact samples.\n"
                    "Finished runs are kept in OUT/rows.jsonl: re-running the same command resumes.",
        formatter_class=HelpFormatter)
    p.add_argument("--out", "-o", default="fidelity_out", help="output folder (rows.jsonl, fidelity.md, fidelity.png)")
    p.add_argument("--grid", choices=sorted(GRIDS), default="default", help="the grid of steps and hyperparameters")
    p.add_argument("--problems", type=_names, default=None, help=f"comma-separated subset of {','.join(PROBLEMS)}")
    p.add_argument("--methods", type=_names, default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--samples", type=int, default=None, help="samples per run (default: the grid's)")
    p.add_argument("--seed", type=int, default=0, help="the seed of every run")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads during the runs")
    p.add_argument("--fresh", action="store_true", help="ignore the finished runs in OUT/rows.jsonl")
    p.add_argument("--quiet", action="store_true", help="no line per run")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Execute ``dps-fast fidelity``; bad settings raise ValueError naming the flag (exit code 2)."""
    from .fidelity import best_rows, run_fidelity

    check_out_dir(args.out, "--out")  # before the runs, not after them
    try:
        report = run_fidelity(out=args.out, grid=args.grid, problems=args.problems, methods=args.methods,
                              seed=args.seed, samples=args.samples, fresh=args.fresh, threads=args.threads,
                              log=None if args.quiet else (lambda m: print(m, flush=True)))
    except ValueError as exc:  # name the flag, not the function argument
        msg = str(exc)
        for name in ("problems", "methods", "grid", "samples", "seed", "threads"):
            if msg.startswith(name + ":"):
                msg = "--" + msg
        raise ValueError(msg) from None
    print("best sliced W2 per problem and method (floor = exact samples of the same count):")
    floors = {r.problem: r.sw2 for r in report.rows if r.method == "exact"}
    for r in best_rows(report.rows):
        print(f"  {r.problem:16s} {r.method:6s} {r.param}={r.value:.4g} K={r.steps:<4d} NFE={r.nfe:<5d} "
              f"SW2={r.sw2:.4f} (floor {floors[r.problem]:.4f})")
    print(f"wrote {report.markdown_path} and {report.plot_path} in {report.seconds:.1f} s "
          f"({report.reused} runs reused from {report.out_dir / 'rows.jsonl'})")
    return 0
