"""Forward models ``y = A(x) + n``: each gives ``A(x)`` and the guidance residual; linear ones
also ``A.adjoint(y)`` and ``A.normal_residual(x, y)``. See the README's operator table."""

from .base import LinearOperator, Measurement, Operator
from .blur import BOUNDARIES, Blur, GaussianBlur, MotionBlur
from .differentiable import Differentiable
from .fourier import SubsampledFourier
from .masks import Identity, Inpainting
from .matrix import Matrix
from .phase import PhaseRetrieval
from .poisson import PoissonNoise
from .superres import SuperResolution

__all__ = [
    "Operator", "LinearOperator", "Measurement", "Identity", "Inpainting", "Blur", "GaussianBlur", "MotionBlur",
    "BOUNDARIES", "Matrix", "SuperResolution", "SubsampledFourier", "PhaseRetrieval", "Differentiable",
    "PoissonNoise",
]
