"""Evaluation: benchmark datasets and their class names, the one mIoU definition (``metrics``), eval runs."""
