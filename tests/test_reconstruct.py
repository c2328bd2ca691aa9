"""``dps-fast reconstruct``: outputs, metrics, bit-identical resume after a crash or a kill,
torchrun sharding (2 gloo processes), bad inputs, fail-fast settings and OOM halving.

Every run uses a random-initialised tiny32 ADMUNet, 4 steps, 2 samples and 32x32 images. The
in-process runs use one intra-op thread, like the ``OMP_NUM_THREADS=1`` subprocesses, so all
runs are bit-comparable (a different thread count changes float summation order).
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dps_fast.cli import main
from dps_fast.models import ADMUNet
from dps_fast.reconstruct import psnr, reconstruct, ssim
from dps_fast.reconstruct import items as items_mod
from dps_fast.reconstruct import manifest as manifest_mod
from dps_fast.reconstruct import runner as runner_mod
from dps_fast.reconstruct.batching import Job, auto_rows, is_oom, stream_chunks
from dps_fast.reconstruct.data import DONE, ITEMS, MANIFEST, METRICS, TENSORS, open_dataset
from dps_fast.reconstruct.distributed import METRIC_COLUMNS
from dps_fast.reconstruct.items import item_seeds

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 5  # odd: the last chunk of 2 images is padded
SAMPLES = 2
BATCH = 2
SUBPROCESS_TIMEOUT = 240


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_png(path: Path, seed: int, size: tuple[int, int] = (32, 32)) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    # Smooth colour gradients plus noise: an image with structure, so PSNR/SSIM are not degenerate.
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([xx, yy, 1 - xx * yy], -1) * 200 + rng.normal(0, 20, (h, w, 3))
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reconstruct_assets")
    g = torch.Generator().manual_seed(0)
    model = ADMUNet.from_config("tiny32")
    with torch.no_grad():
        for p in model.parameters():  # from_config zero-inits the output conv; use small random weights
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ckpt = root / "tiny32.pt"
    torch.save(model.state_dict(), ckpt)
    images = root / "images"
    images.mkdir()
    for i in range(N_IMAGES):
        _write_png(images / f"img{i}.png", i)
    return {"root": root, "ckpt": ckpt, "images": images}


def _args(assets: dict[str, Path], out: Path, *extra: str, images: Path | None = None) -> list[str]:
    return ["reconstruct", str(images or assets["images"]), "--out", str(out), "--model", "tiny32",
            "--checkpoint", str(assets["ckpt"]), "--steps", "4", "--samples", str(SAMPLES), "--batch-size",
            str(BATCH), "--device", "cpu", "--quiet", *extra]


@pytest.fixture(scope="module")
def baseline(assets) -> Path:
    out = assets["root"] / "baseline"
    assert main(_args(assets, out)) == 0
    return out


def _item_files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in (out / ITEMS).rglob("*") if p.is_file()}


def _assert_same_items(out: Path, ref: Path) -> None:
    """Same files; tensors bit-identical (torch.equal); PNGs byte-identical; same metrics except time."""
    assert _item_files(out) == _item_files(ref)
    for folder in sorted((ref / ITEMS).iterdir()):
        a = torch.load(out / ITEMS / folder.name / TENSORS, weights_only=True)
        b = torch.load(folder / TENSORS, weights_only=True)
        assert a.keys() == b.keys()
        for k, v in b.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(a[k], v), f"{folder.name}/{k} differs"
            else:
                assert a[k] == v
        for png in folder.glob("*.png"):
            assert (out / ITEMS / folder.name / png.name).read_bytes() == png.read_bytes(), png
        ma = json.loads((out / ITEMS / folder.name / DONE).read_text())["metrics"]
        mb = json.loads((folder / DONE).read_text())["metrics"]
        strip = [{k: v for k, v in r.items() if k not in ("seconds", "rank")} for r in mb]
        assert [{k: v for k, v in r.items() if k not in ("seconds", "rank")} for r in ma] == strip


def _csv_rows(out: Path) -> list[dict[str, str]]:
    with open(out / METRICS, newline="") as f:
        return list(csv.DictReader(f))


# ---- metrics --------------------------------------------------------------------------------
def test_psnr_known_values():
    x = torch.rand(2, 3, 9, 7, generator=torch.Generator().manual_seed(0)) * 0.5
    assert torch.isinf(psnr(x, x)).all()
    for d in (0.5, 0.1, 1 / 255):
        want = -20 * math.log10(d)  # MSE = d^2 on a data range of 1
        assert psnr(x + d, x).tolist() == pytest.approx([want, want], abs=1e-6)
    # data_range scales the peak: [-1, 1] images with data_range 2 equal [0, 1] images
    assert psnr(2 * (x + 0.1) - 1, 2 * x - 1, data_range=2.0).tolist() == pytest.approx(psnr(x + 0.1, x).tolist())


def _ssim_naive(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. SSIM written out window by window (float64, Gaussian 11x11, sigma 1.5)."""
    c1, c2 = 0.01**2, 0.03**2
    j = np.arange(11) - 5
    g = np.exp(-(j**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    vals = []
    for ch in range(a.shape[0]):
        for i in range(a.shape[1] - 10):
            for k in range(a.shape[2] - 10):
                pa, pb = a[ch, i:i + 11, k:k + 11], b[ch, i:i + 11, k:k + 11]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


@pytest.mark.parametrize("shape", [(1, 11, 11), (3, 16, 13)], ids=["1ch-11x11", "3ch-16x13"])
def test_ssim_against_naive_implementation(shape):
    g = torch.Generator().manual_seed(1)
    a = torch.rand(shape, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert float(ssim(a, b)) == pytest.approx(_ssim_naive(a.numpy(), b.numpy()), rel=1e-10)
    assert float(ssim(a, a)) == pytest.approx(1.0, abs=1e-12)
    batch = torch.stack([a, b])
    assert ssim(batch, torch.stack([b, b])).tolist() == pytest.approx([float(ssim(a, b)), 1.0], abs=1e-12)


# ---- end-to-end -------------------------------------------------------------------------------
def test_cli_outputs_csv_and_manifest(assets, baseline):
    names = [f"img{i}" for i in range(N_IMAGES)]
    per_item = {"measurement.png", "sample_000.png", "sample_001.png", "mean.png", "std.png", TENSORS, DONE}
    assert _item_files(baseline) == {f"{ITEMS}/{n}/{f}" for n in names for f in per_item}
    t = torch.load(baseline / ITEMS / "img3" / TENSORS, weights_only=True)
    assert t["samples"].shape == (SAMPLES, 3, 32, 32) and t["samples"].dtype == torch.float32
    assert t["x"].shape == t["measurement"].shape == t["mean"].shape == t["std"].shape == (3, 32, 32)
    assert torch.equal(t["seeds"], item_seeds(0, "img3", SAMPLES))
    assert torch.allclose(t["mean"], t["samples"].double().mean(0).float())
    assert torch.allclose(t["std"], t["samples"].double().std(0, unbiased=False).float())
    assert t["samples"].abs().max() <= 1.0  # --clip is on by default
    # the clean input is the PNG, and the measurement is A x + noise with sigma_n = 0.05
    x = open_dataset(assets["images"]).load(3)
    assert torch.equal(t["x"], x)
    from dps_fast.operators import GaussianBlur

    resid = (t["measurement"].double() - GaussianBlur(3.0)(x[None].double())[0]).std().item()
    assert 0.04 < resid < 0.06

    rows = _csv_rows(baseline)
    assert list(rows[0].keys()) == list(METRIC_COLUMNS)
    assert [(r["image"], r["sample"]) for r in rows] == [(n, s) for n in names for s in ("mean", "0", "1")]
    r3 = {r["sample"]: r for r in rows if r["image"] == "img3"}
    ref01 = (t["x"].double() + 1) / 2
    mean64 = t["samples"].double().mean(0)  # the metrics use the float64 mean
    want = float(psnr(((mean64 + 1) / 2).clamp(0, 1), ref01))
    assert float(r3["mean"]["psnr"]) == pytest.approx(want, rel=1e-12)
    want = float(ssim(((t["samples"][1].double() + 1) / 2).clamp(0, 1), ref01))
    assert float(r3["1"]["ssim"]) == pytest.approx(want, rel=1e-12)
    assert float(r3["0"]["residual_norm"]) == pytest.approx(float(t["residual_norm"][0]), rel=1e-6)
    assert int(r3["1"]["seed"]) == int(t["seeds"][1])
    assert all(float(r["seconds"]) > 0 for r in rows)

    m = json.loads((baseline / MANIFEST).read_text())
    assert m["status"] == "complete" and m["world_size"] == 1
    assert m["inputs"]["total"] == m["inputs"]["done"] == N_IMAGES and m["inputs"]["skipped"] == []
    for k in ("torch", "triton", "dps_fast", "python", "numpy", "pillow"):
        assert k in m["environment"]["versions"]
    assert m["environment"]["versions"]["torch"] == torch.__version__
    assert m["environment"]["device"] == "cpu" and m["environment"]["device_name"]
    assert "git" in m["environment"]
    assert m["options"]["steps"] == 4 and m["options"]["operator"] == "gaussian-blur"
    assert m["options"]["argv"] and m["settings"]["samples"] == SAMPLES
    assert m["batch"] == {"mode": "fixed", "rows": BATCH * SAMPLES}
    assert m["ranks"][0]["rows"] == BATCH * SAMPLES


def test_rerun_skips_finished_items(assets, baseline, capsys):
    before = {p: p.stat().st_mtime_ns for p in (baseline / ITEMS).rglob("*") if p.is_file()}
    assert main(_args(assets, baseline)) == 0
    assert f"0 now, {N_IMAGES} before" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (baseline / ITEMS).rglob("*") if p.is_file()} == before


def test_other_settings_in_same_folder_are_refused(assets, baseline, capsys):
    assert main(_args(assets, baseline, "--zeta", "0.5")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "zeta" in err and "other settings" in err


# ---- interruption and resume --------------------------------------------------------------------
def test_crash_mid_write_then_resume_is_bit_identical(assets, baseline, tmp_path, monkeypatch):
    out = tmp_path / "crashed"
    calls = {"n": 0}
    real_save = items_mod.save_tensors

    def crash_on_second_item(path, tensors):
        calls["n"] += 1
        if calls["n"] == 2:  # the 2nd item dies after its PNGs, before tensors.pt and done.json
            raise KeyboardInterrupt
        real_save(path, tensors)

    monkeypatch.setattr(items_mod, "save_tensors", crash_on_second_item)
    assert main(_args(assets, out)) == 130
    monkeypatch.undo()
    assert sorted(p.parent.name for p in (out / ITEMS).glob(f"*/{DONE}")) == ["img0"]
    assert (out / ITEMS / "img1" / "mean.png").exists() and not (out / ITEMS / "img1" / TENSORS).exists()
    assert json.loads((out / MANIFEST).read_text())["status"] == "interrupted"  # not "running": it stopped
    assert main(_args(assets, out)) == 0
    _assert_same_items(out, baseline)
    m = json.loads((out / MANIFEST).read_text())
    assert m["status"] == "complete" and m["inputs"]["already_done"] == 1 and m["inputs"]["finished_now"] == 4
    assert len(_csv_rows(out)) == N_IMAGES * (1 + SAMPLES)


def test_killed_process_then_resume_is_bit_identical(assets, baseline, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "dps_fast.cli", *_args(assets, out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    try:
        while not list((out / ITEMS).glob(f"*/{DONE}")):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no item finished before exit/timeout: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done = list((out / ITEMS).glob(f"*/{DONE}"))
    assert 1 <= len(done) < N_IMAGES
    # a SIGKILL leaves "running" in the file; inspecting shows the dead run as interrupted
    assert json.loads((out / MANIFEST).read_text())["status"] == "running"
    assert runner_mod.run_status(json.loads((out / MANIFEST).read_text())) == "interrupted"
    assert main(_args(assets, out)) == 0
    assert json.loads((out / MANIFEST).read_text())["resumed_from"] == "interrupted"
    _assert_same_items(out, baseline)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


# ---- torchrun -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_equal_one_process(assets, baseline, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "dps_fast.cli", *_args(assets, out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _assert_same_items(out, baseline)
    rows = _csv_rows(out)
    assert sorted({r["image"] for r in rows}) == [f"img{i}" for i in range(N_IMAGES)]
    assert len(rows) == N_IMAGES * (1 + SAMPLES)
    assert {r["image"]: r["rank"] for r in rows if r["sample"] == "mean"} == {
        f"img{i}": str(i % 2) for i in range(N_IMAGES)}
    m = json.loads((out / MANIFEST).read_text())
    assert m["world_size"] == 2 and [r["rank"] for r in m["ranks"]] == [0, 1]
    assert m["status"] == "complete" and m["inputs"]["done"] == N_IMAGES

    # A rank that died: its items have no done marker and the merged CSV is gone. The re-run
    # (here one process) redoes only those and merges everything.
    for i in (1, 3):
        (out / ITEMS / f"img{i}" / DONE).unlink()
    (out / METRICS).unlink()
    assert main(_args(assets, out)) == 0
    _assert_same_items(out, baseline)
    m = json.loads((out / MANIFEST).read_text())
    assert m["inputs"]["finished_now"] == 2 and m["inputs"]["already_done"] == 3
    assert len(_csv_rows(out)) == N_IMAGES * (1 + SAMPLES)


# ---- given measurements -------------------------------------------------------------------------
def test_given_measurements_without_clean_inputs(assets, baseline, tmp_path):
    out = tmp_path / "given"
    args = _args(assets, out, "--measurements", str(baseline))
    args.pop(1)  # no clean input folder
    assert main(args) == 0
    for i in range(N_IMAGES):
        a = torch.load(out / ITEMS / f"img{i}" / TENSORS, weights_only=True)
        b = torch.load(baseline / ITEMS / f"img{i}" / TENSORS, weights_only=True)
        assert "x" not in a and torch.equal(a["measurement"], b["measurement"])
        assert torch.equal(a["samples"], b["samples"])  # same y, same per-name seeds, same shapes
    rows = _csv_rows(out)
    assert len(rows) == N_IMAGES * (1 + SAMPLES) and all(r["psnr"] == "" and r["ssim"] == "" for r in rows)


# ---- bad inputs and bad settings ----------------------------------------------------------------
def test_unreadable_and_wrong_size_inputs_are_skipped_and_listed(assets, tmp_path, capsys, caplog):
    images = tmp_path / "mixed"
    images.mkdir()
    _write_png(images / "good.png", 0)
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    _write_png(images / "wide.png", 1, size=(40, 48))
    out = tmp_path / "out"
    assert main(_args(assets, out, "--steps", "2", images=images)) == 0
    err = capsys.readouterr().err + caplog.text
    assert err.count("wide: image is 48x40 pixels, the model needs 32x32") == 1 and "--resize" in err
    assert err.count("broken: cannot read image file") == 1  # logged once, not again in the summary
    m = json.loads((out / MANIFEST).read_text())
    skipped = {s["name"]: s for s in m["inputs"]["skipped"]}
    assert sorted(skipped) == ["broken", "wide"] and skipped["broken"]["path"] == str(images / "broken.png")
    assert m["inputs"]["done"] == 1 and m["status"] == "complete"
    assert sorted(p.name for p in (out / ITEMS).iterdir()) == ["good"]
    # --resize turns the wrong-size image into a usable one (a new folder: resize changes the settings)
    out2 = tmp_path / "resized"
    assert main(_args(assets, out2, "--steps", "2", "--resize", images=images)) == 0
    assert sorted(p.name for p in (out2 / ITEMS).iterdir()) == ["good", "wide"]
    assert torch.load(out2 / ITEMS / "wide" / TENSORS, weights_only=True)["x"].shape == (3, 32, 32)


def test_missing_or_mismatched_checkpoint_fails_before_any_work(assets, tmp_path, capsys):
    out = tmp_path / "never"
    missing = tmp_path / "nope" / "ckpt.pt"
    args = _args(assets, out)
    args[args.index("--checkpoint") + 1] = str(missing)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err
    args = _args(assets, out)
    args[args.index("--model") + 1] = "ffhq256"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--checkpoint: " in err and "of --model ffhq256" in err
    assert len(err) < 1000 and "use --model tiny32" in err  # counts, a few keys, the preset that matches
    assert not out.exists()


# ---- memory-aware batching ----------------------------------------------------------------------
def test_stream_chunks_halves_on_oom_and_splits_samples():
    calls = []

    def fault(rows):
        if rows > 3:
            raise torch.cuda.OutOfMemoryError("fake: CUDA out of memory")

    def run(jobs):
        calls.append([(j.key, j.start, j.stop) for j in jobs])
        return [j.key for j in jobs]

    resized = []
    out = list(stream_chunks("abc", samples=4, rows=8, run=run, fault=fault, on_resize=resized.append))
    assert resized == [4, 2]  # 8 rows (2 images) and 4 rows (1 image) ran out of memory
    assert calls == [[(k, s, s + 2)] for k in "abc" for s in (0, 2)]
    assert [(jobs[0].key, jobs[0].start, rows) for jobs, _, rows in out] == [
        (k, s, 2) for k in "abc" for s in (0, 2)]
    # padding: 3 whole items in calls of 2 -> the last call repeats its job
    calls.clear()
    out = list(stream_chunks("abc", samples=1, rows=2, run=run))
    assert calls == [[("a", 0, 1), ("b", 0, 1)], [("c", 0, 1), ("c", 0, 1)]]
    assert [res for _, res, _ in out] == [["a", "b"], ["c"]]


def test_stream_chunks_errors():
    def oom(rows):
        raise torch.cuda.OutOfMemoryError("fake")

    with pytest.raises(torch.cuda.OutOfMemoryError, match="single row"):
        list(stream_chunks("a", samples=2, rows=2, run=lambda jobs: jobs, fault=oom))
    calls = []

    def boom(jobs):
        calls.append(len(jobs))
        raise RuntimeError("not a memory problem")

    with pytest.raises(RuntimeError, match="not a memory"):
        list(stream_chunks("ab", samples=1, rows=2, run=boom))
    assert calls == [2]  # no retry for other errors
    assert is_oom(RuntimeError("CUDA error: out of memory")) and not is_oom(ValueError("out of memory"))
    assert Job("a", 1, 3).count == 2
    assert auto_rows(lambda r: None, torch.device("cpu"), samples=3) == (6, {"mode": "cpu-default", "rows": 6})
    assert auto_rows(lambda r: None, torch.device("cpu"), samples=2, max_rows=4)[0] == 4


def test_reconstruct_with_injected_oom_completes(assets, tmp_path):
    model = ADMUNet.from_checkpoint(assets["ckpt"], config="tiny32")
    from dps_fast.operators import SuperResolution

    common = dict(steps=2, samples=SAMPLES, device="cpu", progress=False, model_id="tiny32-test")
    data = open_dataset(assets["images"])
    x = torch.stack([data.load(i) for i in range(3)])
    seen = []

    def fault(rows):
        seen.append(rows)
        if rows > SAMPLES:
            raise torch.cuda.OutOfMemoryError("fake: CUDA out of memory")

    finished = []
    a = reconstruct(x, tmp_path / "oom", model, SuperResolution(4), batch_size=3, fault=fault,
                    on_item_done=finished.append, **common)
    assert finished == ["00000", "00001", "00002"]
    # 3 images x 2 samples = 6 rows fail; halved to 3 rows, i.e. calls of 1 image (2 rows)
    assert seen == [6, 2, 2, 2]
    assert a.status == "complete" and a.done == 3 and a.rows == 3
    m = json.loads((tmp_path / "oom" / MANIFEST).read_text())
    assert m["ranks"][0]["rows"] == 3
    # After halving, calls hold one image each, exactly as a run with batch_size=1.
    b = reconstruct(x, tmp_path / "ref", model, SuperResolution(4), batch_size=1, **common)
    assert b.done == 3
    _assert_same_items(tmp_path / "oom", tmp_path / "ref")
    assert torch.load(tmp_path / "ref" / ITEMS / "00000" / TENSORS, weights_only=True)["measurement"].shape == (3, 8, 8)


def test_auto_rows_fits_a_linear_memory_model(monkeypatch):
    """The CUDA probe with torch.cuda's memory statistics faked: peak = 1 GiB + 0.25 GiB/row."""
    gib = 2**30
    state = {"peak": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=0))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 5 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5 * gib + state["peak"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * gib, 80 * gib))
    probed = []

    def step(rows):
        probed.append(rows)
        state["peak"] = gib + gib // 4 * rows

    dev = torch.device("cuda", 0)
    rows, info = auto_rows(step, dev, samples=3)
    # 90% of 20 GiB = 18 GiB; (18 - 1) / 0.25 = 68 rows, rounded down to whole images of 3 samples
    assert probed == [2, 8] and rows == 66 and info["bytes_per_row"] == gib // 4
    assert auto_rows(step, dev, samples=1, max_rows=40)[0] == 40
    assert auto_rows(step, dev, samples=100)[0] == 68  # less than one image: split its samples

    def step_oom(rows):
        if rows > 2:
            raise torch.cuda.OutOfMemoryError("fake")

    assert auto_rows(step_oom, dev, samples=1) == (4, {"mode": "probe-oom", "rows": 4})


def test_probe_step_runs_one_guided_step(assets):
    from dps_fast import DPS, NoiseSchedule
    from dps_fast.operators import Inpainting
    from dps_fast.reconstruct.runner import probe_step

    model = ADMUNet.from_checkpoint(assets["ckpt"], config="tiny32")
    op = Inpainting.box((32, 32), (16, 16))
    dps = DPS(model, NoiseSchedule.linear(1000).respace(3), op, sigma_n=0.05, clip_x0=(-1, 1))
    batches = []
    model.register_forward_hook(lambda mod, args, out: batches.append((args[0].shape[0], out.requires_grad)))
    probe_step(dps, (1, 3, 32, 32), (3, 32, 32), torch.device("cpu"))(5)
    assert (5, True) in batches  # a forward with a graph (for the VJP) on 5 rows


def test_diffusers_folder_model(assets, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    folder = tmp_path / "pipe"
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(folder / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(
        folder / "scheduler")
    out = tmp_path / "out"
    args = _args(assets, out, "--diffusers", str(folder), "--operator", "inpaint-box", "--steps", "2")
    i = args.index("--model")
    del args[i:i + 4]  # no --model/--checkpoint
    assert main(args) == 0
    m = json.loads((out / MANIFEST).read_text())
    assert m["status"] == "complete" and m["inputs"]["done"] == N_IMAGES
    assert m["settings"]["model"].startswith("DiffusersEpsModel:") and m["settings"]["schedule"]["steps"] == 2
    cosine = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
    from dps_fast import NoiseSchedule

    want = NoiseSchedule.from_betas(torch.as_tensor(cosine.betas)).respace(2)
    assert m["settings"]["schedule"] == manifest_mod.schedule_id(want)  # the folder's (cosine) betas
    y = torch.load(out / ITEMS / "img0" / TENSORS, weights_only=True)["measurement"]
    assert (y[:, 8:24, 8:24].abs() <= 0.25).all()  # the centred 16x16 box holds only noise


def test_checkpointing_is_chosen_by_measured_throughput():
    from dps_fast.reconstruct.batching import pick_checkpointing

    calls = []

    def measure(flag):
        calls.append(flag)
        return (64, 2.0) if flag else (16, 1.0)  # on: 32 rows/s, off: 16 rows/s

    on, info = pick_checkpointing(measure)
    assert on and calls == [False, True] and info["checkpointing_rows_per_s"] == {"off": 16.0, "on": 32.0}
    assert "rows" not in info  # merged into the manifest's batch info beside its own "rows"
    # when everything already fits without it, recomputation only costs time
    off, _ = pick_checkpointing(lambda flag: (16, 1.3) if flag else (16, 1.0))
    assert not off
