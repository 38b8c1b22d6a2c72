"""Serving Label Studio's ML backend protocol: the WSGI app (``server``), the backend (``backend``), the
process-level models and caches (``runtime``), interactive prompts (``interactive``), follow-up predictions
(``followups``), the gunicorn worker (``worker``) and the container's health check (``healthcheck``).
"""
