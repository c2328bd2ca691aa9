"""The `dps-fast demo` command: writes one PNG and reports the errors against the exact posterior."""

import subprocess
import sys

from dps_fast.cli import main


def test_demo_writes_png_and_reports(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--steps", "60", "--samples", "8", "--quiet"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    text = capsys.readouterr().out
    assert "mean_rel_err[about right]" in text and "wrote" in text


def test_demo_bad_option_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "x.png"), "--steps", "0", "--quiet"]) == 2
    assert "steps" in capsys.readouterr().err


def test_console_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "dps_fast.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "demo" in r.stdout
