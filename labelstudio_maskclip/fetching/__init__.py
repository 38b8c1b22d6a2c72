"""Fetching task images for serving, training and the CLI: URL rules (``urls``, ``uris``), Label Studio
authentication (``auth``), the fetcher (``fetch``), decoding (``decode``, ``jpeg``) and their errors; ``images`` is
the surface the rest imports.
"""
