"""Writes tests/data/store-schema1.sqlite3 with the store of schema 1 (the code before versioned migrations,
git commit ee600da): ``PYTHONPATH=<that checkout> python make_store_schema1.py store-schema1.sqlite3``."""

import sys

import numpy as np

from labelstudio_maskclip.learning.store import SCHEMA_VERSION, AnnotationWrite, Store, TaskRecord

assert SCHEMA_VERSION == 1
out = sys.argv[1]
store = Store(out)
yy, xx = np.mgrid[:24, :32]
disc = (yy - 12) ** 2 + (xx - 16) ** 2 <= 49
square = np.zeros((24, 32), bool)
square[2:9, 3:12] = True
store.put_tasks(
    [
        TaskRecord(1, 7, "/data/upload/7/a.png", 32, 24),
        TaskRecord(2, 7, "/data/upload/7/b.png"),
        TaskRecord(3, 8, "s3://bucket/c.jpg"),
        TaskRecord(4, 8, "/data/upload/8/d.png"),
    ]
)
store.put_annotation(
    AnnotationWrite(
        id=11,
        task=TaskRecord(1, 7),
        author="ann@example.com",
        height=24,
        width=32,
        masks={"cat": disc, "dog": square},
        sources={"dog": "polygon"},
        parent_prediction=5,
        accepted_unchanged=False,
        outcomes=[("r1", "cat", "edited"), ("r2", "dog", "added")],
        updated_at="2026-11-02T10:00:00Z",
    )
)
store.put_annotation(
    AnnotationWrite(
        id=12,
        task=TaskRecord(2, 7),
        height=24,
        width=32,
        masks={"cat": square},
        ground_truth=True,
        accepted_unchanged=True,
        parent_prediction=6,
        outcomes=[("r1", "cat", "unchanged")],
        updated_at="2026-11-02T11:00:00Z",
    )
)
store.put_annotation(
    AnnotationWrite(
        id=13, task=TaskRecord(3, 8), height=24, width=32, masks={"bird": disc}, updated_at="2026-11-02T12:00:00Z"
    )
)
store.delete_annotations([13])  # a tombstone
store.put_annotation(AnnotationWrite(id=14, task=TaskRecord(4, 8), cancelled=True, updated_at="2026-11-02T13:00:00Z"))
store.mark_trained(seq=2, project=7, model_version="maskclip+-1", metrics={"miou": 0.42})
store.put_annotation(
    AnnotationWrite(
        id=15, task=TaskRecord(2, 7), height=24, width=32, masks={"dog": disc}, updated_at="2026-11-02T14:00:00Z"
    )
)
print(store.current_seq(), store.training_runs())
store.close()
