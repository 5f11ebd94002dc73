"""SSD-style photometric distortion as a detectron2 augmentation.

The distortion of the SSD paper (Liu et al., ECCV 2016), as used by Mask2Former's semantic and
panoptic training mappers (``INPUT.COLOR_AUG_SSD``). Each of four operations is applied with
probability 1/2:

* brightness: add ``delta ~ U(-32, 32)``;
* contrast: multiply by ``alpha ~ U(0.5, 1.5)``, either first or last (probability 1/2 each);
* saturation: multiply the HSV saturation by ``alpha ~ U(0.5, 1.5)``;
* hue: shift the OpenCV hue (0..179) by an integer ``delta ~ U{-18..18}``, modulo 180.

Each step clips to [0, 255] and truncates back to uint8. The random draws happen in
:class:`ColorAugSSD` (with ``np.random``, like every detectron2 augmentation, so a seeded
loader is reproducible); :class:`ColorAugSSDTransform` applies fixed parameters to the image and
leaves segmentation maps and coordinates unchanged.
"""
from typing import Optional, Tuple

import cv2
import numpy as np

from detectron2.data.transforms import Augmentation, NoOpTransform, Transform

__all__ = ["ColorAugSSD", "ColorAugSSDTransform"]


def _scale_shift(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


class ColorAugSSDTransform(Transform):
    """Fixed photometric distortion of a uint8 [H, W, 3] image; identity on masks and coords.

    Args:
        img_format: channel order of the images, ``"RGB"`` or ``"BGR"``.
        brightness_delta: value added to every channel, or None to skip.
        contrast_alpha: contrast factor, or None to skip.
        saturation_alpha: factor on the HSV saturation, or None to skip.
        hue_delta: integer shift of the OpenCV hue, or None to skip.
        contrast_last: apply the contrast after saturation and hue instead of before.
    """

    def __init__(
        self,
        img_format: str = "RGB",
        brightness_delta: Optional[float] = None,
        contrast_alpha: Optional[float] = None,
        saturation_alpha: Optional[float] = None,
        hue_delta: Optional[int] = None,
        contrast_last: bool = False,
    ):
        super().__init__()
        if img_format not in ("RGB", "BGR"):
            raise ValueError(f"ColorAugSSD supports RGB or BGR images, got format {img_format!r}")
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"ColorAugSSD expects a uint8 [H, W, 3] image, got {img.dtype} {img.shape}")
        bgr = np.ascontiguousarray(img[:, :, ::-1] if self.img_format == "RGB" else img)
        if self.brightness_delta is not None:
            bgr = _scale_shift(bgr, beta=self.brightness_delta)
        if self.contrast_alpha is not None and not self.contrast_last:
            bgr = _scale_shift(bgr, alpha=self.contrast_alpha)
        if self.saturation_alpha is not None:
            hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
            hsv[:, :, 1] = _scale_shift(hsv[:, :, 1], alpha=self.saturation_alpha)
            bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        if self.hue_delta is not None:
            hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
            hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.int32) + int(self.hue_delta)) % 180).astype(np.uint8)
            bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        if self.contrast_alpha is not None and self.contrast_last:
            bgr = _scale_shift(bgr, alpha=self.contrast_alpha)
        out = bgr[:, :, ::-1] if self.img_format == "RGB" else bgr
        return np.ascontiguousarray(out)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    def inverse(self) -> Transform:
        # photometric: geometry is unchanged, so the inverse for coordinates is the identity
        return NoOpTransform()


class ColorAugSSD(Augmentation):
    """Draw the parameters of a :class:`ColorAugSSDTransform` (see the module docstring).

    Args:
        img_format: ``"RGB"`` or ``"BGR"`` (``cfg.INPUT.FORMAT``).
        brightness_delta: brightness shifts are drawn from U(-delta, delta).
        contrast_range, saturation_range: factors are drawn uniformly from these ranges.
        hue_delta: hue shifts are drawn from the integers in [-delta, delta].
        prob: probability of applying each operation.
    """

    def __init__(
        self,
        img_format: str = "RGB",
        brightness_delta: float = 32.0,
        contrast_range: Tuple[float, float] = (0.5, 1.5),
        saturation_range: Tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
        prob: float = 0.5,
    ):
        super().__init__()
        if img_format not in ("RGB", "BGR"):
            raise ValueError(f"ColorAugSSD supports RGB or BGR images, got format {img_format!r}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> ColorAugSSDTransform:
        rand = np.random

        def maybe(draw):
            return draw() if rand.rand() < self.prob else None

        brightness = maybe(lambda: float(rand.uniform(-self.brightness_delta, self.brightness_delta)))
        contrast_last = bool(rand.rand() < 0.5)
        contrast = maybe(lambda: float(rand.uniform(*self.contrast_range)))
        saturation = maybe(lambda: float(rand.uniform(*self.saturation_range)))
        hue = maybe(lambda: int(rand.randint(-self.hue_delta, self.hue_delta + 1)))
        return ColorAugSSDTransform(
            self.img_format, brightness, contrast, saturation, hue, contrast_last=contrast_last
        )
