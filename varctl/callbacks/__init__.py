"""Callbacks the stages share: the predict image writer and the TensorBoard image grids."""

from varctl.callbacks.images import ImageGrid, ImageLogger, control_pictures
from varctl.callbacks.writer import ImageWriter, save_png

__all__ = ["ImageGrid", "ImageLogger", "ImageWriter", "control_pictures", "save_png"]
