"""Triton kernels of dps_fast (installed as ``dps_fast.kernels``).

One module per kernel family; each holds ``@triton.jit`` functions and their host launchers
only. Input checks, dtype policy and docstrings for users live in
:mod:`dps_fast.backends.triton_ops`, the only intended caller.

* :mod:`.philox`   -- Philox4x32-10 and the Box-Muller normals of :mod:`dps_fast.noise` (four per
  call, on ``[rows, 4]`` tiles)
* :mod:`.update`   -- fused Tweedie + DDPM + guidance update (one pass over the state; eps/v read
  with a per-sample stride)
* :mod:`.prep`     -- Tweedie, clip mask, elementwise residual with per-sample partial sums
* :mod:`.spectral` -- spectral stage of the FFT blur's normal residual
* :mod:`.launch`   -- launch configuration (block size, warps) keyed on problem size, and the
  device guard every launcher runs under
"""
