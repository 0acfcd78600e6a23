"""Stand-in ``torchvision.io``: what transformers.image_utils imports; see the package docstring."""

import enum

from torchvision import _unavailable


class ImageReadMode(enum.Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4


decode_image = _unavailable("io.decode_image")
