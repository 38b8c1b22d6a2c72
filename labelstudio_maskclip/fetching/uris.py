"""The URI forms Label Studio puts in ``task.data`` for an image (docs/label-studio.md, "Images").

One list, used by the image fetcher (which resolves each form) and by the webhook reader (which recognises
an image among a task's data values).
"""

from __future__ import annotations

__all__ = ["CLOUD_SCHEMES", "CLOUD_PREFIXES", "IMAGE_URI_PREFIXES"]

#: URI schemes of Label Studio's cloud storages, resolved by Label Studio's presign endpoint.
CLOUD_SCHEMES: tuple[str, ...] = ("s3", "gs", "gcs", "azure-blob")
#: ``s3://``, ``gs://``, ``gcs://``, ``azure-blob://``
CLOUD_PREFIXES: tuple[str, ...] = tuple(f"{scheme}://" for scheme in CLOUD_SCHEMES)
#: Every prefix of an image reference: web URLs, cloud URIs, Label Studio's own paths (``/data/upload/``,
#: ``/data/local-files/``) and inline ``data:image/`` URIs.
IMAGE_URI_PREFIXES: tuple[str, ...] = ("http://", "https://", *CLOUD_PREFIXES, "/data/", "data:image/")
