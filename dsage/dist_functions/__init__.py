"""Computations written as DistributedFunctions: factoring (ECM) and POV-Ray rendering."""

from .factor import DistributedFactor
from .povray import DistributedPOVRay

__all__ = ["DistributedFactor", "DistributedPOVRay"]
