"""Memory per image: the label map at the original size is computed a band of rows at a time, and large
images are box-averaged in uint8 before the float resize. Checked for equality with the direct
computations, and for peak memory in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labelstudio_maskclip.engine import segmenter as seg_mod

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "grid,size", [((5, 6), (50, 61)), ((28, 37), (480, 640)), ((1, 125), (1, 2000)), ((40, 30), (7, 9))]
)
@pytest.mark.parametrize("budget", [2**22, 97])  # one band, or a band of a row or two
def test_banded_label_map_equals_the_direct_upsampling(monkeypatch, grid, size, budget):
    monkeypatch.setattr(seg_mod, "_UPSAMPLE_BUDGET", budget)
    torch.manual_seed(0)
    probs = torch.rand(7, *grid).softmax(0)
    seg = seg_mod._finalize(probs, size, 5, 0.15)
    up = F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]  # (7, H, W)
    value, index = up.max(0)
    index[(index >= 5) | (value < 0.15)] = seg_mod.NO_LABEL
    assert seg.labels.dtype == np.int16 and seg.labels.shape == size
    # Equal up to float rounding: a pixel whose two best classes tie within 1e-7 may go either way.
    assert (seg.labels != index.numpy()).mean() < 1e-4
    np.testing.assert_allclose(seg.confidence, value.numpy(), atol=1e-6)
    areas = np.bincount(index.numpy()[index.numpy() >= 0], minlength=5)[:5]
    assert np.abs(seg.class_areas - areas).max() <= 2
    valid = index >= 0
    assert seg.score == pytest.approx(float(value[valid].double().mean()), abs=1e-6)


def test_box_shrink_averages_blocks_and_leaves_small_images_alone():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1003, 2011, 3), dtype=np.uint8)
    out = seg_mod._box_shrink(img, (100, 200))  # factors 5 and 5
    assert out.shape == (200, 402, 3) and out.dtype == np.uint8
    exact = img[:1000, :2010].reshape(200, 5, 402, 5, 3).astype(np.float64).mean((1, 3))
    assert np.abs(out - exact).max() <= 1.0  # Pillow rounds in fixed point
    small = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    assert seg_mod._box_shrink(small, (100, 200)) is small  # under 4x: unchanged
    tall = rng.integers(0, 256, (1003, 301, 3), dtype=np.uint8)
    out = seg_mod._box_shrink(tall, (100, 100))  # factors 5 down, 1 across (301 < 4 x 100)
    exact = tall[:1000].reshape(200, 5, 301, 3).astype(np.float64).mean(1)
    assert out.shape == (200, 301, 3) and np.abs(out - exact).max() <= 1.0
    wide = np.ascontiguousarray(tall.transpose(1, 0, 2))
    assert seg_mod._box_shrink(wide, (100, 100)).shape == (301, 200, 3)
    assert seg_mod._box_shrink(tall, (250, 100)).shape == (501, 301, 3)  # 4x the size: halved
    assert seg_mod._box_shrink(wide, (100, 250)).shape == (301, 501, 3)


def test_large_image_normalised_close_to_the_direct_resize():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    img = np.kron(base, np.ones((20, 20, 1), np.uint8))  # 1200 x 1600, smooth blocks
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    ours = seg_mod.normalized_batch([img], (120, 160), mean, std)
    direct = F.interpolate(
        torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255, size=(120, 160), mode="bilinear", antialias=True
    )
    assert (ours - direct).abs().mean() < 0.01


PEAK = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    sys.path.insert(0, sys.argv[1])
    from labelstudio_maskclip.engine import segmenter as seg_mod
    torch.set_num_threads(1)
    probs = torch.rand(21, 250, 250).softmax(0)
    img = np.full((4000, 4000, 3), 120, np.uint8)
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    seg_mod.normalized_batch([img[:64, :64]], (32, 32), mean, std)  # load kernels
    seg_mod._finalize(probs[:, :4, :4], (8, 8), 20, 0.0)
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts here: imports' peaks not counted
    batch = seg_mod.normalized_batch([img], (448, 448), mean, std)
    seg = seg_mod._finalize(probs, (4000, 4000), 20, 0.0)
    peak = status("VmHWM")
    print(json.dumps({"over_base_mib": peak - base, "labels": list(seg.labels.shape)}))
    """
)


def test_peak_memory_for_a_16_megapixel_image_stays_small():
    """Before: the (16, H, W) float chunk of upsampled probabilities and the float copies of the photo cost
    over 1.5 GiB at 16 megapixels; now the outputs (int16 labels, float32 confidence: 96 MiB) and bands."""
    out = subprocess.run([sys.executable, "-c", PEAK, str(ROOT)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["labels"] == [4000, 4000]
    # The peak counts from the base on (VmHWM reset): 317 MiB measured; up to 1460 MiB inside the loaded suite
    # while the imports' own peak was counted too; before the banded finalize: 1672 MiB.
    assert result["over_base_mib"] < 1350, result
