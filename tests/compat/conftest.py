"""Fixtures of the dps2022 drop-in tests: the tiny32 ADM conformance weights in a stand-in of their
UNetModel, a measurement problem, and their diffusion_config keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.compat.standins import create_unet


# The tiny32 conformance weights live in the repository (tests/fixtures/adm, a copy of the shared
# fixtures with their key layout), so a fresh clone runs these tests: a missing file fails.
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "adm" / "adm_tiny32_conformance.pt"


def needs_fixture(test):  # kept so the tests read as before; the fixture is always there now
    return test


def diffusion_config(**over) -> dict:
    """The keys of their configs/diffusion_config.yaml (their checkpoint settings), respaced."""
    cfg = dict(sampler="ddpm", steps=1000, noise_schedule="linear", model_mean_type="epsilon",
               model_var_type="learned_range", dynamic_threshold=False, clip_denoised=True,
               rescale_timesteps=False, timestep_respacing=5)
    cfg.update(over)
    return cfg


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every compat test runs its small chains on one thread (tests/conftest.py's one_thread)."""


@pytest.fixture(scope="session")
def tiny32() -> dict:
    # The file exists whenever the folder does: a missing file must fail, not skip.
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="session")
def small_unet():
    """A smaller UNetModel (stand-in) for chains: 16x16, two levels, attention at 8x8, learned
    variance; every weight moved off its initialisation (their zero-initialised output layer
    would make eps = 0), float32, eval mode. ~4x cheaper per step than tiny32."""
    model = create_unet(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", learn_sigma=True,
                        attention_resolutions="8", num_heads=2, use_scale_shift_norm=True, resblock_updown=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture
def unet(tiny32):
    """Their UNetModel (stand-in) with the conformance weights, eval mode, float32."""
    model = create_unet(**tiny32["config"])
    model.load_state_dict(tiny32["state_dict"], strict=True)
    return model.eval()
