"""Mask codecs and pictures, numpy only: Label Studio brush RLE (``brush``), COCO RLE (``coco_rle``),
polygons (``polygons``), overlays (``overlay``). Every encoder has its decoder beside it.

Convention for every mask in the package: a (H, W) numpy array, ``bool`` (or ``uint8`` 0/1), row-major, at the
image's original size after EXIF orientation.
"""
