"""A whole MaskCLIP+ training run (teacher included) and the served student's speed, on a GPU or the CPU.

Where ``bench_train.py`` times the student's step alone, this runs ``training.train.train`` as the trigger
does: ViT-B/16 teacher (random weights saved to a file: the speed does not depend on them) labelling each
crop through the served preset, deeplabv3_resnet50 student (random init), people's masks on a quarter of
the photos (rectangles: the content does not change the cost), validation, checkpoint and promotion. Two
runs of different lengths give the cost of one step without the start-up (difference of the wall times),
then the promoted student segments photos on the same device.

    python benchmarks/bench_train_run.py --device cuda [--steps 5 25] [--batch 8] [--crop 512]
    python benchmarks/bench_train_run.py --device cpu --steps 1 3 --batch 2 --crop 128 --short-side 224
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from labelstudio_maskclip.learning.store import AnnotationWrite, Store, TaskRecord  # noqa: E402
from labelstudio_maskclip.settings import Settings  # noqa: E402
from labelstudio_maskclip.training import checkpoints as ck  # noqa: E402
from labelstudio_maskclip.training import train as tr  # noqa: E402
from labelstudio_maskclip.training.student import load_student  # noqa: E402

PHOTOS = Path(__file__).resolve().parent.parent / "tests" / "data" / "coco128-seg" / "images"
CLASSES = ["person", "car", "dog", "chair"]


def fill(store: Store, n: int) -> dict[str, np.ndarray]:
    """n COCO128 photos as tasks; every fourth carries people's masks (two rectangles)."""
    images = {}
    for tid, path in enumerate(sorted(PHOTOS.glob("*.jpg"))[:n]):
        img = np.asarray(Image.open(path).convert("RGB"))
        images[path.name] = img
        task = TaskRecord(tid, image=path.name)
        store.put_tasks([task])
        if tid % 4 == 0:
            h, w = img.shape[:2]
            person, car = np.zeros((h, w), bool), np.zeros((h, w), bool)
            person[h // 4 : h // 2, w // 4 : w // 2] = True
            car[h // 2 :, w // 2 :] = True
            store.put_annotation(AnnotationWrite(id=10_000 + tid, task=task, masks={"person": person, "car": car},
                                                 height=h, width=w))  # fmt: skip
    return images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, nargs=2, default=[5, 25], help="the two runs' lengths")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--photos", type=int, default=32)
    ap.add_argument("--short-side", type=int, default=0, help="the teacher's resize (0: the preset's)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    work = Path(tempfile.mkdtemp(prefix="bench-train-run-"))
    import open_clip

    torch.manual_seed(0)
    weights = work / "vit_b16_random.pt"
    torch.save(open_clip.create_model("ViT-B-16").state_dict(), weights)
    walls = []
    for steps in [1, *args.steps]:  # the first run warms the device up (kernels, cuDNN's choices)
        model_dir = work / f"run-{steps}"
        store = Store(model_dir)
        images = fill(store, args.photos)
        extra = {"short_side": args.short_side} if args.short_side else {}
        s = Settings(model_dir=str(model_dir), model="ViT-B-16", pretrained=str(weights), device=args.device,
                     student="deeplabv3_resnet50", student_pretrained="none", train_steps=steps,
                     train_batch_size=args.batch, train_crop=args.crop, promote="always", train_val_fraction=0.25,
                     **extra)  # fmt: skip
        sync()
        t0 = time.perf_counter()
        result = tr.train(s, store, load_image=lambda ref, tid: images[ref], classes=CLASSES, progress=False)
        sync()
        walls.append(time.perf_counter() - t0)
        assert result.promoted, "the run did not promote its student"
        print(f"run of {steps} steps: {walls[-1]:.1f} s wall (teacher load, data, steps, validation, checkpoint)")
    walls = walls[1:]
    per_step = (walls[1] - walls[0]) / (args.steps[1] - args.steps[0])
    mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "-"
    student = load_student(ck.current_checkpoint(model_dir), args.device)
    photos = [images[k] for k in sorted(images)[:16]]
    student.segment(photos, CLASSES)  # warm-up: the first use of each input shape costs far more
    sync()
    t0 = time.perf_counter()
    segs = student.segment(photos, CLASSES)
    sync()
    serve = time.perf_counter() - t0
    assert all(seg.labels.shape == img.shape[:2] for seg, img in zip(segs, photos))
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print("| device | teacher | student | crop | batch | s per step (teacher + student) | images/s trained | "
          f"run of {args.steps[1]} steps, s | peak memory | student serving, images/s (16 photos) |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---|---:|")
    print(f"| {device} | ViT-B/16 (random) | deeplabv3_resnet50 | {args.crop} | {args.batch} | {per_step:.3f} | "
          f"{args.batch / per_step:.1f} | {walls[1]:.1f} | {mem} | {len(photos) / serve:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
