"""The README's tables of measured numbers equal what ``python bench/readme.py`` builds from the committed
results files their markers name (bench/readme.py), so a stale figure fails here."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_readme", ROOT / "bench" / "readme.py")
readme = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme)

# column headers that only a table of measured numbers has: such a table must be generated
MEASURED_HEADERS = {"measured", "sliced W2", "s/sample", "images/s", "speed-up", "mean err"}


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_tables_equal_their_results_files():
    text = _readme()
    new, specs = readme.render(text)
    assert new == text, "README tables differ from their results files: run python bench/readme.py"
    kinds = [s.split()[0] for s in specs]
    assert "cpu-figures" in kinds and any(s.startswith("section") and "fidelity" in s for s in specs), specs
    for spec in specs:  # every source is a committed results file
        assert spec.split()[1].startswith("bench/results/"), spec


def test_every_measured_table_is_generated():
    inside, outside, table = False, [], []
    for line in _readme().split("\n") + [""]:
        if line.startswith("<!-- table:"):
            inside = True
        elif line == readme.END:
            inside = False
        elif line.startswith("|") and not inside:
            table.append(line)
            continue
        if table:
            outside.append(table)
            table = []
    for t in outside:
        header = {c.strip().strip("`") for c in t[0].strip("|").split("|")}
        assert not header & MEASURED_HEADERS, f"a table of measured numbers written by hand: {t[0]}"


def test_a_changed_figure_is_caught():
    text = _readme()
    m = re.search(r"^\| `reconstruct` images/s.*\| (\d+\.\d+)x \|", text, re.M)
    assert m, "the CPU table's reconstruct row"
    stale = text[:m.start(1)] + "9.99" + text[m.end(1):]
    assert readme.render(stale)[0] == text


def test_check_exits_1_on_a_stale_readme(tmp_path, capsys):
    (tmp_path / "bench" / "results").mkdir(parents=True)
    results = "# run\n\n## Best\n\nprose\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n## Other\n\n| c |\n|---|\n| 3 |\n"
    (tmp_path / "bench" / "results" / "r.md").write_text(results)
    marker = "<!-- table: section bench/results/r.md Best -->"
    good = f"intro\n\n{marker}\n| a | b |\n|---|---|\n| 1 | 2 |\n<!-- /table -->\n\nend\n"
    (tmp_path / "README.md").write_text(good.replace("| 1 | 2 |", "| 1 | 3 |"))
    assert readme.main(["--check", "--readme", str(tmp_path / "README.md")]) == 1
    assert "-| 1 | 3 |" in capsys.readouterr().out
    assert readme.main(["--readme", str(tmp_path / "README.md")]) == 0
    assert (tmp_path / "README.md").read_text() == good
    assert readme.main(["--check", "--readme", str(tmp_path / "README.md")]) == 0


@pytest.mark.parametrize("spec, match", [
    ("section bench/results/r.md Missing", "no heading 'Missing'"),
    ("section bench/results/r.md", "expected one HEADING"),
    ("section bench/results/none.md Best", "no file bench/results/none.md"),
    ("plot bench/results/r.md", "expected a kind among"),
    ("cpu-figures bench/results/b.jsonl", "no benchmark 'test_step\\[eager-b4\\]'"),
])
def test_bad_markers_are_named(tmp_path, spec, match):
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "r.md").write_text("## Best\n\n| a |\n|---|\n| 1 |\n")
    (tmp_path / "bench" / "results" / "b.jsonl").write_text(json.dumps({"name": "other", "extra_info": {}}) + "\n")
    with pytest.raises(readme.TableError, match=match):
        readme.build(spec, tmp_path)


def test_a_marker_without_its_end_is_refused():
    with pytest.raises(readme.TableError, match="without its"):
        readme.render("<!-- table: section bench/results/x.md H -->\n| a |\n")


def test_rows_kind_lists_chosen_values_of_matching_benchmarks(tmp_path):
    (tmp_path / "bench" / "results").mkdir(parents=True)
    lines = [{"name": "test_a[x]", "median_s": 0.012345, "extra_info": {"ratio": 1.23456, "ci": [1, 2.5]}},
             {"name": "test_a[y]", "median_s": 2.0, "extra_info": {"ratio": 10.0, "ci": [0.5, 3]}},
             {"name": "test_b", "median_s": 1.0, "extra_info": {}}]
    (tmp_path / "bench" / "results" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    got = readme.build(r"rows bench/results/b.jsonl 'test_a\[.*\]' median_s ratio ci", tmp_path)
    assert got.split("\n") == ["| benchmark | median_s | ratio | ci |", "| --- | ---: | ---: | ---: |",
                               "| `test_a[x]` | 0.0123 | 1.23 | [1, 2.5] |", "| `test_a[y]` | 2 | 10 | [0.5, 3] |"]
    with pytest.raises(readme.TableError, match="has no 'ratio'"):
        readme.build("rows bench/results/b.jsonl test_b ratio", tmp_path)
