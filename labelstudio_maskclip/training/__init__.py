"""MaskCLIP+: a student segmentation network trained on MaskCLIP's pseudo labels and people's masks,
validated against people's masks, promoted atomically (``checkpoints``). Runs in its own process; the
server never imports it on the request path except to load a promoted student.
"""
