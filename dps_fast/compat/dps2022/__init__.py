"""Drop-in for the original DPS code (DPS2022/diffusion-posterior-sampling): change one import.

In a script written for that code base, replace

    from guided_diffusion.gaussian_diffusion import create_sampler

with

    from dps_fast.compat.dps2022 import create_sampler

and keep everything else: ``create_sampler(**diffusion_config)`` takes the keys of their
``diffusion_config.yaml`` and ``sampler.p_sample_loop(model, x_start, measurement,
measurement_cond_fn, record, save_root)`` takes their UNetModel, conditioning method (bound
``conditioning``, possibly a ``functools.partial`` with a mask), operator and noiser objects. What
runs fast and what differs is in :mod:`dps_fast.compat.dps2022.diffusion` and the README section
"Coming from the DPS code". ``dps-fast dps2022 --model_config ... --diffusion_config ...
--task_config ...`` is their ``sample_condition.py`` (needs PyYAML: ``pip install dps-fast[dps2022]``).

Example:
    >>> from dps_fast.compat.dps2022 import create_sampler
    >>> create_sampler(sampler="ddim", steps=1000, noise_schedule="linear", model_mean_type="epsilon",
    ...                model_var_type="learned_range", dynamic_threshold=False, clip_denoised=True,
    ...                rescale_timesteps=False, timestep_respacing=50)
    DDIM(steps=50/1000, mean=epsilon, var=learned_range, clip=True, rng='philox')
"""

from .diffusion import DDIM, DDPM, SpacedDiffusion, create_sampler, get_named_beta_schedule
from .images import clear_color

__all__ = ["create_sampler", "SpacedDiffusion", "DDPM", "DDIM", "get_named_beta_schedule", "clear_color"]
