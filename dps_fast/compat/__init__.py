"""Adapters to other DPS code bases, translated at the edge: the core never imports them.

* :mod:`dps_fast.compat.dps2022` -- a drop-in for the original DPS code
  (DPS2022/diffusion-posterior-sampling): ``create_sampler(**diffusion_config)`` whose
  ``p_sample_loop`` takes that code's model, conditioning method, operator and noiser objects.
"""

__all__: list[str] = []
