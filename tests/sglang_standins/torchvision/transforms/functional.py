"""Stand-in ``torchvision.transforms.functional``; see the package docstring."""

from torchvision import _unavailable
from torchvision.transforms import InterpolationMode

__all__ = ["InterpolationMode", "pil_to_tensor"]

pil_to_tensor = _unavailable("transforms.functional.pil_to_tensor")
