"""The dps2022 drop-in against the original DPS code's loop, whole chains, same model and task.

"theirs" is their ``p_sample_loop`` + ``PosteriorSampling`` written out from their algorithm
(tests/compat/standins.py): their UNetModel (a stand-in with their key layout, attention
recomputed in the backward as guided-diffusion forces), weights with ``requires_grad=True``,
autograd through the whole step, one norm over the batch, a ``.item()`` per step, and one image
per call (their ``t != 0`` test only works at batch 1). "ours" is
``create_sampler(...).p_sample_loop`` given the same objects: the UNetModel converted to ADMUNet,
the fused DPS step. Reported in extra_info: seconds per chain and the ratio theirs / ours, for
one image (the same work) and for ``B`` images (theirs one after another, ours in one batch).

CPU: tiny32 (32x32) with their Gaussian blur (kernel 9, std 1, reflect) and their inpainting,
10 steps. GPU: ffhq256 with random weights (the checkpoint's compute), 10 steps.
"""

from __future__ import annotations

import functools

import pytest
import torch

from _timing import interleaved_medians
from _util import gpu_info
from dps_fast.compat.dps2022 import create_sampler
from dps_fast.models.adm import ADM_CONFIGS
from dps_original import force_reference_attention
from tests.compat.standins import (GaussialBlurOperator, GaussianNoise, InpaintingOperator, PosteriorSampling,
                                   create_unet, even_keep, their_ddpm_loop)

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
STEPS = 10
CASES = [("tiny32", op, b) for op in ("gaussian_blur", "inpainting") for b in (1, 4)] if not CUDA else \
    [("ffhq256", "gaussian_blur", b) for b in (1, 8)]


def _their_model(cfg: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_unet(**cfg)
    with torch.no_grad():  # exercise the zero-initialised output layers like a trained checkpoint
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    force_reference_attention(model)  # their AttentionBlock always recomputes under checkpoint
    return model.to(DEV).eval()  # requires_grad stays True, as in their script


def _task(op_name: str, size: int, batch: int):
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(DEV)
    if op_name == "gaussian_blur":
        op, kw = GaussialBlurOperator(61 if size >= 256 else 9, 3.0 if size >= 256 else 1.0, DEV), {}
    else:
        op = InpaintingOperator(DEV)
        kw = {"mask": (torch.rand(1, 1, size, size, generator=g) > 0.5).float().to(DEV)}
    y = op.forward(x0, **kw) + 0.05 * torch.randn(x0.shape, generator=g).to(DEV)
    cond = PosteriorSampling(op, GaussianNoise(0.05), scale=0.3)
    return functools.partial(cond.conditioning, **kw), y


@pytest.mark.parametrize("config,op_name,batch", CASES, ids=[f"{c}-{o}-b{b}" for c, o, b in CASES])
def test_dps2022_chain_theirs_vs_ours(benchmark, config, op_name, batch):
    cfg = ADM_CONFIGS[config]  # their create_model arguments of the preset
    model = _their_model(cfg)
    size = cfg["image_size"]
    fn, y = _task(op_name, size, batch)
    x_start = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2)).to(DEV)
    keep = even_keep(1000, STEPS)
    sampler = create_sampler(sampler="ddpm", steps=1000, noise_schedule="linear", model_mean_type="epsilon",
                             model_var_type="learned_range", dynamic_threshold=False, clip_denoised=True,
                             rescale_timesteps=False, timestep_respacing=STEPS, progress=False)

    def theirs():  # one image per call, as their script runs
        for b in range(batch):
            their_ddpm_loop(model, x_start[b:b + 1].clone(), y[b:b + 1], fn, keep)

    def ours():
        sampler.p_sample_loop(model, x_start.clone(), y, fn, record=False, save_root=None)

    med = interleaved_medians({"theirs": theirs, "ours": ours}, reps=3 if CUDA else 5, warmup=1, device=DEV)
    benchmark.extra_info.update(gpu_info() | {
        "config": config, "operator": op_name, "batch": batch, "steps": STEPS, "median_s": med,
        "speedup_theirs_over_ours": med["theirs"] / med["ours"], "path": sampler.last_plan.get("path"),
        "images_per_s": {k: batch / v for k, v in med.items()},
    })
    benchmark.pedantic(ours, rounds=2 if CUDA else 3, iterations=1, warmup_rounds=0)
