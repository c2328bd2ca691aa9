"""The ``dps-fast`` command as a new user meets it: the demo figure and where it lands, help
text, exit codes (2 usage/input, 1 divergence, 3 internal), one-line errors for bad checkpoints
and paths, --random-weights, and the reconstruct run's messages, metrics and status."""

from __future__ import annotations

import csv
import json
import re
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dps_fast.cli import main
from dps_fast.models import ADMUNet
from dps_fast.operators import GaussianBlur, Identity
from dps_fast.reconstruct import reconstruct
from dps_fast.reconstruct import runner as runner_mod
from dps_fast.reconstruct.data import MANIFEST, METRICS

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path: Path, seed: int = 0, size: int = 32) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, format="PNG")
    return path


# ---- demo -------------------------------------------------------------------------------------
def test_demo_figure_lands_in_demo_out_with_64_samples_per_panel_and_visible_harm(tmp_path, monkeypatch):
    from dps_fast.demo import DEFAULT_ZETA, run_demo

    monkeypatch.chdir(tmp_path)
    s = run_demo(progress=False)  # the defaults of `dps-fast demo`: 250 steps, 64 samples per zeta
    out = tmp_path / "demo_out" / "dps_demo.png"
    assert s["out"] == str(Path("demo_out") / "dps_demo.png") and not (tmp_path / "dps_demo.png").exists()
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 100_000
    assert s["samples"] == {"too small": 64, "about right": 64, "too large": 64}
    assert s["zeta"]["too large"] == pytest.approx(4 * DEFAULT_ZETA)
    # Measured (seed 0): mean error 0.37 / 0.046 / 0.24, sliced W2 0.19 / 0.040 / 0.12 and DPS std
    # 1.5x / 0.83x / 0.68x the exact std for too small / about right / too large. The bounds keep
    # >= 2x margins on the gaps, so the "too large" panel cannot look "about right".
    assert s["mean_rel_err[too large]"] > 2 * s["mean_rel_err[about right]"]
    assert s["mean_rel_err[too small]"] > 2 * s["mean_rel_err[about right]"]
    assert s["sliced_w2[too large]"] > 1.5 * s["sliced_w2[about right]"]
    assert s["std_ratio[too large]"] < 0.8 < s["std_ratio[about right]"]


def test_demo_command_prints_each_panel(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d.png"), "--steps", "20", "--samples", "8", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "(too small)" in text and "(about right)" in text and "(too large)" in text and "wrote" in text
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_outputs_are_ignored_by_git():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for rel in ("demo_out/dps_demo.png", "demo_out/explore.html"):
        r = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", rel], timeout=30)
        assert r.returncode == 0, f"{rel} is not ignored"


# ---- help --------------------------------------------------------------------------------------
def _help(*argv: str) -> str:
    r = subprocess.run([sys.executable, "-m", "dps_fast.cli", *argv, "--help"], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_top_level_help_has_examples_and_exit_codes_and_no_rest_markup():
    text = _help()
    assert "``" not in text
    assert "examples:" in text and "dps-fast demo" in text and "dps-fast explore" in text
    assert "exit codes:" in text
    for code in ("0 ", "1 ", "2 ", "3 ", "130"):
        assert f"\n  {code}" in text


def test_reconstruct_help_shows_each_default_once_and_how_to_get_a_checkpoint():
    text = _help("reconstruct")
    assert "(default: None)" not in text
    options = text.split("\n  -")  # one chunk per option
    assert not [o for o in options if o.count("(default") > 1]
    backend = next(o for o in options if o.startswith("-backend"))
    assert "triton" in backend and "CUDA" in backend  # it has a help text now
    out = next(o for o in options if o.startswith("o OUT") or o.startswith("-out"))
    assert "default" not in out  # required
    assert "ffhq_10m.pt" in text and "guided-diffusion" in text and "--random-weights" in text
    assert "metrics.csv" in text and "seconds" in text and "--merge-only" in text


# ---- exit codes ---------------------------------------------------------------------------------
def test_usage_error_exits_2_without_traceback(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "--steps" in err and "Traceback" not in err


def test_divergence_exits_1(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d.png"), "--steps", "20", "--samples", "4", "--zeta", "5",
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "diverged" in err and "step i=" in err and "Traceback" not in err


def test_internal_error_exits_3_in_one_line_and_v_shows_the_traceback(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("something internal\nsecond line")

    monkeypatch.setattr("dps_fast.demo._main", broken)  # add_parser registers it when main() builds the parser
    assert main(["demo"]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "internal error: RuntimeError: something internal" in err
    assert "re-run with -v" in err
    assert main(["-v", "demo"]) == 3
    assert "Traceback" in capsys.readouterr().err


# ---- reconstruct: inputs, checkpoints and settings --------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli_images")
    _png(folder / "a.png", 0)
    return folder


def _recon(images: Path, out: Path, *extra: str) -> list[str]:
    return ["reconstruct", str(images), "--out", str(out), "--model", "tiny32", "--steps", "2", "--samples", "1",
            "--batch-size", "1", "--device", "cpu", "--quiet", *extra]


def test_out_pointing_at_a_file_is_a_usage_error(images, tmp_path, capsys):
    target = tmp_path / "taken.png"
    target.write_bytes(b"x")
    assert main(_recon(images, target, "--random-weights")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dps-fast reconstruct: error: --out:")
    assert "is a file" in err and target.read_bytes() == b"x"


@pytest.mark.parametrize("content, reason", [
    (None, "it is a PNG image"),
    (b"PK\x03\x04truncated", "a damaged or truncated torch.save archive"),
    (b"", "the file is empty"),
], ids=["png", "truncated", "empty"])
def test_non_checkpoint_file_is_a_clear_one_line_error(images, tmp_path, capsys, content, reason):
    bad = tmp_path / "ckpt.pt"
    if content is None:
        _png(bad)
    else:
        bad.write_bytes(content)
    out = tmp_path / "out"
    assert main(_recon(images, out, "--checkpoint", str(bad))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"--checkpoint: {str(bad)!r} is not a readable state_dict ({reason}" in err
    assert "weights_only" not in err and not out.exists()


def test_negative_sigma_n_is_rejected_before_any_work(images, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_recon(images, out, "--random-weights", "--sigma-n", "-0.1")) == 2
    assert "--sigma-n" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ValueError, match="sigma_n: expected a finite standard deviation >= 0"):
        reconstruct(images, out, ADMUNet.from_config("tiny32"), Identity(), sigma_n=-0.1, device="cpu")
    assert not out.exists()


def test_triton_on_a_cpu_fails_before_any_output(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "out"
    assert main(_recon(images, out, "--random-weights", "--backend", "triton")) == 2
    assert "backend: 'triton' runs on CUDA devices" in capsys.readouterr().err
    assert not out.exists()  # no manifest saying "running"


def test_random_weights_need_a_model_and_no_checkpoint(images, tmp_path, capsys):
    assert main(_recon(images, tmp_path / "o", "--random-weights", "--checkpoint", "x.pt")) == 2
    assert "--random-weights: pass either --checkpoint" in capsys.readouterr().err
    assert main(_recon(images, tmp_path / "o")) == 2
    assert "--checkpoint: required with --model tiny32" in capsys.readouterr().err


# ---- reconstruct: a run's messages, metrics and status ------------------------------------------
def test_metrics_csv_grows_as_items_finish(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        _png(folder / f"im{i}.png", i)
    out = tmp_path / "out"
    seen: list[int] = []

    def on_done(name: str) -> None:  # metrics.csv already holds every finished item's rows
        with open(out / METRICS, newline="") as f:
            rows = list(csv.DictReader(f))
        seen.append(len({r["image"] for r in rows}))

    reconstruct(folder, out, ADMUNet.from_config("tiny32"), GaussianBlur(3.0), steps=2, samples=2, batch_size=1,
                device="cpu", progress=False, on_item_done=on_done)
    assert seen == [1, 2, 3]


def test_random_weights_run_without_a_checkpoint(images, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(_recon(images, out, "--random-weights")) == 0
    m = json.loads((out / MANIFEST).read_text())
    assert m["status"] == "complete" and m["options"]["model_source"]["random_weights"] == {"seed": 0, "scale": 0.05}
    assert "1/1 input done" in capsys.readouterr().out  # not "1/1 inputs"


def test_empty_input_folder_warns(tmp_path, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    with caplog.at_level(logging.WARNING):
        s = reconstruct(empty, tmp_path / "out", ADMUNet.from_config("tiny32"), Identity(), steps=2, device="cpu",
                        progress=False, allow_nothing=True)
    assert s.total == 0 and s.status == "nothing-done"
    assert "no inputs found in" in caplog.text and str(empty) in caplog.text
    # without allow_nothing the Python API raises, naming why
    from dps_fast.reconstruct.runner import NothingReconstructed

    with pytest.raises(NothingReconstructed, match="nothing was reconstructed: no inputs were found"):
        reconstruct(empty, tmp_path / "out2", ADMUNet.from_config("tiny32"), Identity(), steps=2, device="cpu",
                    progress=False)


def test_all_inputs_skipped_exits_4_with_status_nothing_done(tmp_path, capsys):
    """Every input unreadable: nothing reconstructed is not "complete" and not exit 0."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    (folder / "b.png").write_bytes(b"nor this")
    out = tmp_path / "out"
    code = main(["reconstruct", str(folder), "--out", str(out), "--model", "tiny32", "--random-weights",
                 "--steps", "2", "--device", "cpu", "--quiet"])
    assert code == 4
    err = capsys.readouterr().err
    assert "nothing was reconstructed: all 2 inputs were skipped" in err and "nothing-done" in err
    assert json.loads((out / MANIFEST).read_text())["status"] == "nothing-done"


def test_merge_only_shows_an_interrupted_run(images, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"

    def stop(name: str) -> None:
        raise KeyboardInterrupt

    real = runner_mod.reconstruct
    monkeypatch.setattr(runner_mod, "reconstruct", lambda *a, **k: real(*a, **dict(k, on_item_done=stop)))
    assert main(_recon(images, out, "--random-weights")) == 130
    monkeypatch.undo()
    m = json.loads((out / MANIFEST).read_text())
    assert m["status"] == "interrupted" and "KeyboardInterrupt" in m["error"]
    # a killed run (status left at "running", its process gone) is shown as interrupted too
    m.update(status="running", process={"hostname": m["process"]["hostname"], "pid": 2**22 + 12345, "start": None})
    (out / MANIFEST).write_text(json.dumps(m))
    assert runner_mod.run_status(m) == "interrupted"
    capsys.readouterr()
    assert main(["reconstruct", "--out", str(out), "--merge-only"]) == 0
    assert "status: complete, 1/1 input done" in capsys.readouterr().out  # its one item had finished


@pytest.mark.parametrize("method,extra", [("dps", ()), ("mcg", ("--operator", "inpaint-box", "--zeta", "0.5")),
                                          ("pigdm", ("--weighting", "public")), ("ddrm", ("--eta", "0.5"))])
def test_reconstruct_runs_every_registered_method(images, tmp_path, capsys, method, extra):
    out = tmp_path / method
    argv = _recon(images, out, "--random-weights", "--method", method, *extra)
    if method != "mcg":
        argv += ["--operator", "denoise"]
    assert main(argv) == 0, capsys.readouterr().err
    m = json.loads((out / MANIFEST).read_text())
    assert m["status"] == "complete"
    assert m["settings"].get("method", {"name": "dps"})["name"] == method
    # a resumed run of the same command finds the item done (same fingerprint)
    assert main(argv) == 0 and "0 now, 1 before" in capsys.readouterr().out


@pytest.mark.parametrize("extra,msg", [
    (("--method", "ddrm", "--zeta", "1"), "--zeta: not a setting of --method ddrm"),
    (("--method", "dps", "--eta", "0.5"), "--eta: not a setting of --method dps"),
    (("--method", "pigdm", "--guidance", "squared"), "--guidance: only applies to --method dps / mcg"),
    (("--method", "dps", "--weighting", "public"), "--weighting: only applies to --method pigdm"),
    (("--method", "ddrm", "--eta", "1.5"), "--eta: expected a number in [0, 1]"),
    (("--method", "ddrm", "--variance", "fixed_large"), "variance: ddrm does not use"),
])
def test_method_flags_of_another_method_are_refused(images, tmp_path, capsys, extra, msg):
    assert main(_recon(images, tmp_path / "o", "--random-weights", "--operator", "denoise", *extra)) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("method", ["dps", "mcg", "pigdm", "ddrm"])
def test_auto_batch_probe_runs_every_method(method):
    """--batch-size auto's memory probe (one step on dummy rows) works for every registered method."""
    import torch

    from dps_fast import NoiseSchedule
    from dps_fast.methods.registry import get_method
    from dps_fast.reconstruct.runner import probe_step

    spec = get_method(method)
    model = ADMUNet.from_config("tiny32").eval()
    sampler = spec.build(model, NoiseSchedule.linear(1000).respace(3), Identity(), spec.default, sigma_n=0.05,
                         compile=False)
    probe_step(sampler, (1, 3, 32, 32), (3, 32, 32), torch.device("cpu"))(2)  # raises if a method cannot


def test_reconstruct_progress_shows_the_steps_of_the_batch_in_flight(images, tmp_path, capsys):
    """Besides the bar over images, the sampler's bar over the steps of the batch being sampled."""
    argv = [a for a in _recon(images, tmp_path / "o", "--random-weights") if a != "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "reconstruct:" in err and re.search(r"DPS: .*\d/2 .*step", err), err[-2000:]  # 2 steps


def test_a_method_that_cannot_run_the_operator_fails_before_any_output(images, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(_recon(images, out, "--random-weights", "--method", "mcg", "--operator", "gaussian-blur")) == 2
    assert "operator: MCG supports" in capsys.readouterr().err
    assert not out.exists()
