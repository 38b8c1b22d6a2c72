"""Commands that orchestrate the rest, beside the CLI: bulk pre-annotation (``preannotate``), re-scoring
after a new model (``rescore``), the connection check (``doctor``) and Label Studio's network rules (``network``).
"""
