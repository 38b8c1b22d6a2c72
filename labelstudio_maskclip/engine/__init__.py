"""The engine: a frozen open_clip model turned into a dense classifier (MaskCLIP and its successors).

Pure tensors and arrays in and out. Imports nothing of the rest of the package: no settings, no HTTP,
no Label Studio. Pipeline: ``loading`` (weights) -> ``text`` (class embeddings) -> ``dense`` (patch
features of the last block) -> ``refine`` (key smoothing, prompt denoising) -> ``segmenter`` (images in,
label maps and scores out).
"""
