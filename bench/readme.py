"""Write the README's tables of measured numbers from the committed results files, so they are never stale.

Every such table in README.md sits between two markers that name how it is built and from what:

    <!-- table: KIND SOURCE [ARG ...] (python bench/readme.py writes this table; do not edit it by hand) -->
    | ... |
    <!-- /table -->

``python bench/readme.py`` rewrites every marked block from its SOURCE (a file under bench/results/);
``python bench/readme.py --check`` changes nothing and exits 1 with a diff when a block differs from what
its source gives (tests/test_readme_tables.py runs the same check). The kinds:

* ``section SOURCE HEADING``: the first markdown table under ``## HEADING`` of a results markdown file,
  verbatim (``dps-fast fidelity``'s ``fidelity.md``, or any command that writes a markdown table);
* ``cpu-figures SOURCE``: the CPU figures of a benchmark run, from its ``bench.jsonl`` (one line per
  benchmark, written by bench/conftest.py): each row names the benchmark and the extra_info value it shows;
* ``rows SOURCE PATTERN KEY [KEY ...]``: one row per benchmark of a ``bench.jsonl`` whose name matches the
  regular expression PATTERN, one column per KEY (an extra_info value, or ``median_s``), numbers to 3
  significant digits.

Adding a table: a results file that already holds the table needs only the two markers in the README
(kind ``section``); otherwise write a function ``(source: Path, args: list[str]) -> str`` returning the
table's lines and register it in ``KINDS``. Standard library only.

Example:
    python bench/readme.py            # rewrite the tables in README.md
    python bench/readme.py --check    # exit 1 and show the difference when a table is stale
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN = re.compile(r"^<!-- table: (?P<spec>.*?)(?: \(python bench/readme\.py[^)]*\))? -->$")
END = "<!-- /table -->"


class TableError(ValueError):
    """A marker, source file or value that a table cannot be built from (the message says which)."""


# ---- kind "section": a markdown table copied from a results file -------------------------------------
def section_table(source: Path, args: Sequence[str]) -> str:
    """The first table (consecutive ``|`` lines) under the heading ``args[0]`` (any level) of ``source``."""
    if len(args) != 1:
        raise TableError(f"section: expected one HEADING after the source file, got {list(args)}")
    heading = args[0]
    lines = source.read_text(encoding="utf-8").splitlines()
    starts = [k for k, ln in enumerate(lines) if re.fullmatch(r"#+ +" + re.escape(heading) + r" *", ln)]
    if not starts:
        raise TableError(f"{source}: no heading {heading!r}")
    table: list[str] = []
    for ln in lines[starts[0] + 1:]:
        if ln.startswith("#"):
            break
        if ln.startswith("|"):
            table.append(ln)
        elif table:
            break
    if not table:
        raise TableError(f"{source}: no table under the heading {heading!r}")
    return "\n".join(table)


# ---- kind "cpu-figures": derived figures of one benchmark run --------------------------------------
def load_benchmarks(source: Path) -> dict[str, dict]:
    """``{benchmark name: extra_info}`` of a ``bench.jsonl`` (the last line of a name wins, as in report.py)."""
    rows: dict[str, dict] = {}
    for k, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TableError(f"{source}:{k}: not a JSON line ({exc})") from None
            rows[row["name"]] = row.get("extra_info", {})
    return rows


def _value(rows: dict[str, dict], source: Path, name: str, key: str) -> "float | list":
    if name not in rows:
        raise TableError(f"{source}: no benchmark {name!r}")
    if rows[name].get(key) is None:
        raise TableError(f"{source}: benchmark {name!r} has no {key!r}")
    return rows[name][key]


def _x(v: float, digits: int) -> str:
    return f"{v:.{digits}f}"


def _span(values: Sequence[float], digits: int) -> str:
    """``lo-hi`` at ``digits`` decimals (one number when they round alike)."""
    lo, hi = _x(min(values), digits), _x(max(values), digits)
    return lo if lo == hi else f"{lo}-{hi}"


def _matching(rows: dict[str, dict], source: Path, pattern: str) -> list[str]:
    names = sorted(n for n in rows if re.fullmatch(pattern, n))
    if not names:
        raise TableError(f"{source}: no benchmark matches {pattern!r}")
    return names


def cpu_figures_table(source: Path, args: Sequence[str]) -> str:
    """The README's "Measured so far, on the CPU only" table."""
    if args:
        raise TableError(f"cpu-figures: expected only the source file, got extra {list(args)}")
    rows = load_benchmarks(source)
    v = lambda name, key: _value(rows, source, name, key)  # noqa: E731
    each = lambda pattern, key: [v(n, key) for n in _matching(rows, source, pattern)]  # noqa: E731

    step = "test_step[eager-b4]"
    lo, hi = v(step, "overhead_ci95_pct")
    dps2022 = r"test_dps2022_chain_theirs_vs_ours\[tiny32-.*-b{}\]"
    boundary = "test_blur_normal_residual_boundary[{}]"
    torch_vs_reference = each(r"test_dps_step_cpu\[.*\]", "speedup_torch_vs_reference")
    body = [
        ("tiny32 ADM step at batch 4 over the network forward + input VJP alone",
         f"{v(step, 'overhead_over_floor_pct'):+.1f}% (95% interval {lo:+.1f}% to {hi:+.1f}%)", step),
        ("same step against the original DPS code path", f"{_x(v(step, 'speedup_vs_original'), 2)}x faster", step),
        ("torch backend against autograd through the whole step",
         f"{_span(torch_vs_reference, 2)}x faster", "test_dps_step_cpu[*]"),
        ("`reconstruct` images/s, batch 8 against batch 1 (tiny32)",
         f"{_x(v('test_cpu_images_per_s_vs_batch[batch8]', 'speedup_vs_batch1'), 2)}x",
         "test_cpu_images_per_s_vs_batch"),
        ("dps2022 drop-in against their loop, tiny32, 1 / 4 images",
         f"{_span(each(dps2022.format(1), 'speedup_theirs_over_ours'), 1)}x / "
         f"{_span(each(dps2022.format(4), 'speedup_theirs_over_ours'), 2)}x", "test_dps2022_chain_theirs_vs_ours"),
        ("reflect / replicate / zero blur normal residual against circular, [32, 3, 256, 256], 61 taps",
         " / ".join(f"{_x(v(boundary.format(b), 'ratio_vs_circular'), 1)}x" for b in ("reflect", "replicate", "zero")),
         "test_blur_normal_residual_boundary"),
        ("a step with `Differentiable(A)` against the built-in `A` of the same cost",
         f"{_x(v('test_generic_operator_step[differentiable]', 'step_ratio_differentiable_vs_builtin'), 2)}x",
         "test_generic_operator_step"),
        ("`DPS.sample` against a bare loop of steps (1 ms steps: the worst case)",
         f"{_x(v('test_chain_overhead[DPS.sample]', 'sample_over_bare_loop'), 2)}x", "test_chain_overhead"),
    ]
    out = ["| figure (CPU, one thread) | measured | benchmark |", "| --- | --- | --- |"]
    out += [f"| {what} | {value} | `{bench}` |" for what, value, bench in body]
    return "\n".join(out)


# ---- kind "rows": chosen values of chosen benchmarks ---------------------------------------------
def _cell(v: object) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, (int, float)):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_cell(u) for u in v) + "]"
    return str(v).replace("|", "\\|")


def rows_table(source: Path, args: Sequence[str]) -> str:
    """``| benchmark | KEY ... |``: the benchmarks of ``source`` matching ``args[0]``, the values ``args[1:]``."""
    if len(args) < 2:
        raise TableError(f"rows: expected a PATTERN and at least one KEY after the source file, got {list(args)}")
    pattern, keys = args[0], list(args[1:])
    rows: dict[str, dict] = {}
    for line in source.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["name"]] = dict(row.get("extra_info", {}), median_s=row.get("median_s"))
    out = ["| benchmark | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
    for name in _matching(rows, source, pattern):
        out.append(f"| `{name}` | " + " | ".join(_cell(_value(rows, source, name, k)) for k in keys) + " |")
    return "\n".join(out)


#: marker kind -> builder ``(source, args) -> table text``
KINDS: dict[str, Callable[[Path, Sequence[str]], str]] = {
    "section": section_table,
    "cpu-figures": cpu_figures_table,
    "rows": rows_table,
}


# ---- the README ---------------------------------------------------------------------------------
def build(spec: str, root: Path = ROOT) -> str:
    """The table text for one marker's ``KIND SOURCE [ARG ...]``."""
    try:
        kind, source, *args = shlex.split(spec)
    except ValueError as exc:
        raise TableError(f"marker {spec!r}: {exc}") from None
    if kind not in KINDS:
        raise TableError(f"marker {spec!r}: expected a kind among {', '.join(KINDS)}, got {kind!r}")
    path = root / source
    if not path.is_file():
        raise TableError(f"marker {spec!r}: no file {source} (committed results live under bench/results/)")
    return KINDS[kind](path, args)


def render(text: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """``text`` with every marked block rebuilt, and the specs of the blocks found, in order."""
    lines = text.split("\n")
    out: list[str] = []
    specs: list[str] = []
    k = 0
    while k < len(lines):
        m = BEGIN.match(lines[k])
        if lines[k].startswith("<!-- table:") and m is None:
            raise TableError(f"README line {k + 1}: malformed table marker {lines[k]!r}")
        out.append(lines[k])
        k += 1
        if m is None:
            continue
        end = next((j for j in range(k, len(lines)) if lines[j] == END), None)
        if end is None or any(BEGIN.match(ln) for ln in lines[k:end]):
            raise TableError(f"README line {k}: table marker without its {END!r}")
        specs.append(m.group("spec"))
        out.extend(build(m.group("spec"), root).split("\n"))
        out.append(END)
        k = end + 1
    return "\n".join(out), specs


def main(argv: "Sequence[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/readme.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table is stale")
    parser.add_argument("--readme", type=Path, default=README, help="the README to rewrite (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        old = args.readme.read_text(encoding="utf-8")
        new, specs = render(old, args.readme.resolve().parent)
    except (OSError, TableError) as exc:
        print(f"bench/readme.py: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), "README.md",
                                                       "README.md from the results files"))
            print("bench/readme.py: the README's tables differ from their results files; run python bench/readme.py",
                  file=sys.stderr)
            return 1
        print(f"{len(specs)} tables match their results files")
        return 0
    if new != old:
        args.readme.write_text(new, encoding="utf-8")
    print(f"{'rewrote' if new != old else 'unchanged:'} {len(specs)} tables of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
