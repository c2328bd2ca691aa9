"""Forward models ``y = A x + n``: each gives ``A(x)``, ``A.adjoint(y)`` and ``A.normal_residual(x, y)``."""

from .base import LinearOperator, Measurement
from .blur import Blur, GaussianBlur, MotionBlur
from .fourier import SubsampledFourier
from .masks import Identity, Inpainting
from .matrix import Matrix
from .superres import SuperResolution

__all__ = [
    "LinearOperator", "Measurement", "Identity", "Inpainting", "Blur", "GaussianBlur", "MotionBlur",
    "Matrix", "SuperResolution", "SubsampledFourier",
]
