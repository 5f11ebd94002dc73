"""The one place where the mappers read files from disk.

Every image or annotation read by the Mask2Former mappers goes through :func:`read_image_file`
or :func:`read_label_file`. A file that is missing, truncated, not an image, or (for labels) not
single-channel raises :class:`UnreadableFileError`, which names the file. A mapper that should
skip such samples instead of failing can catch this one exception and return ``None``:
Detectron2's ``MapDataset`` then logs a warning and draws another sample.
"""
import zlib

import numpy as np

from detectron2.data import detection_utils as utils

__all__ = ["UnreadableFileError", "read_image_file", "read_label_file"]


class UnreadableFileError(OSError):
    """A dataset file cannot be read or decoded (``filename`` holds its path)."""

    #: what to do, appended to the message unless a caller gives its own
    DEFAULT_HINT = ("Replace the file with an intact copy, or set DATALOADER.SKIP_UNREADABLE_FILES True "
                    "to skip unreadable training samples with a warning.")

    def __init__(self, path: str, kind: str, reason: str, hint: str = None):
        self.kind = kind
        self.reason = reason
        hint = self.DEFAULT_HINT if hint is None else hint
        super().__init__(f"Cannot read the {kind} file {path}: {reason}. {hint}".rstrip())
        self.filename = path

    def __str__(self) -> str:
        return self.args[0]


# what PIL raises on a missing, truncated, unidentified or corrupt file
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error)


def read_image_file(path: str, format=None, kind: str = "image") -> np.ndarray:
    """Read and fully decode an image with detectron2's ``read_image`` (EXIF orientation applied).

    Args:
        path: the file.
        format: a PIL mode, ``"BGR"``, or None to keep the stored mode.
        kind: what the file is, for the error message (``"image"``, ``"panoptic annotation"``).
    Returns:
        the pixels, uint8 [H, W, C] (or [H, W] for single-channel files read with format None).
    Raises:
        UnreadableFileError: naming ``path``.
    """
    try:
        return utils.read_image(path, format=format)
    except _DECODE_ERRORS as e:
        raise UnreadableFileError(path, kind, f"{type(e).__name__}: {e}") from e


def read_label_file(path: str, kind: str = "semantic annotation") -> np.ndarray:
    """Read a single-channel label PNG in its stored mode (``L``, ``P`` indices, ``I;16``).

    Returns:
        the labels [H, W] (uint8 or uint16).
    Raises:
        UnreadableFileError: naming ``path``, also when the file has several channels.
    """
    labels = read_image_file(path, format=None, kind=kind)
    if labels.ndim != 2:
        raise UnreadableFileError(
            path, kind, f"expected a single-channel label image, got shape {labels.shape}"
        )
    return labels
