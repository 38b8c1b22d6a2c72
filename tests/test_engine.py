"""The MaskCLIP engine: the method's equations, shapes, sizes, sliding window, refinements, modes, loading."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labelstudio_maskclip import NO_LABEL, MaskCLIP, SegmentOptions
from labelstudio_maskclip.engine import dense as dense_mod
from labelstudio_maskclip.engine import loading as loading_mod
from labelstudio_maskclip.engine import segmenter as seg_mod
from labelstudio_maskclip.engine.loading import WeightsError, load_clip, resolve_device, resolve_dtype
from labelstudio_maskclip.engine.refine import key_smoothing, prompt_denoising
from labelstudio_maskclip.engine.text import resolve_templates
from tests.tiny import TINY_RN, TINY_VIT, save_random_state


@pytest.fixture(scope="module")
def rn_file(tmp_path_factory):
    return save_random_state(TINY_RN, tmp_path_factory.mktemp("w") / "tiny_rn.pt")


@pytest.fixture(scope="module")
def vit(weights):
    return MaskCLIP.load(model=TINY_VIT, pretrained=str(weights), device="cpu")


@pytest.fixture(scope="module")
def rn(rn_file):
    return MaskCLIP.load(model=TINY_RN, pretrained=str(rn_file), device="cpu")


def _pixels(seed: int, h: int, w: int, b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _block(blk, x: torch.Tensor, visual, **kw) -> torch.Tensor:
    """open_clip's own block on (B, N, W), whatever layout this open_clip version's blocks take."""
    if getattr(visual.transformer, "batch_first", False):
        return blk(x, **kw)
    return blk(x.transpose(0, 1), **kw).transpose(0, 1)  # open_clip < 2.26: (N, B, W)


def _self_only_mask(n: int) -> torch.Tensor:
    mask = torch.full((n, n), float("-inf"))
    mask.fill_diagonal_(0.0)
    return mask


# --- the method's equations ------------------------------------------------------------------------


def test_value_path_equals_block_output_when_tokens_attend_only_to_themselves(vit):
    visual = vit.clip.model.visual
    blk = visual.transformer.resblocks[-1]
    x = torch.randn(2, 17, 64)
    expected = _block(blk, x, visual, attn_mask=_self_only_mask(17))  # open_clip's own block
    ours, keys = dense_mod._last_block(blk, x, "maskclip", (4, 4))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    w_k = blk.attn.in_proj_weight[64:128]
    b_k = blk.attn.in_proj_bias[64:128]
    torch.testing.assert_close(keys, F.linear(blk.ln_1(x), w_k, b_k))


def test_dense_logits_match_open_clip_forward_with_self_attention_only(vit):
    """At the native size, MaskCLIP features are open_clip's tower with a diagonal mask in the last block."""
    visual = vit.clip.model.visual
    pixels = _pixels(0, 32, 32)
    emb = vit.text_embeddings(["cat", "dog", "tree"], templates=["a photo of a {}."])
    if hasattr(visual, "_embeds"):  # open_clip >= 3: its own embedding step
        x = visual._embeds(pixels)
    else:
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], 1) + visual.positional_embedding
        x = visual.ln_pre(x)
    for blk in visual.transformer.resblocks[:-1]:
        x = _block(blk, x, visual)
    x = _block(visual.transformer.resblocks[-1], x, visual, attn_mask=_self_only_mask(x.shape[1]))
    f = F.normalize(visual.ln_post(x[:, 1:]) @ visual.proj, dim=-1)  # (B, 16, D)
    expected = torch.einsum("bnd,kd->bkn", f, emb).reshape(2, 3, 4, 4)
    logits = vit.dense_logits(pixels, emb)
    assert logits.dtype == torch.float32 and logits.shape == (2, 3, 4, 4)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert logits.abs().max() <= 1.0 + 1e-6


def test_resnet_dense_features_are_value_and_output_projections_as_1x1_convs(rn):
    visual = rn.clip.model.visual
    pixels = _pixels(1, 64, 96)
    trunk = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(pixels)))))  # (B, C, 2, 3)
    pool = visual.attnpool
    v = F.conv2d(trunk, pool.v_proj.weight[:, :, None, None], pool.v_proj.bias)
    f = F.normalize(F.conv2d(v, pool.c_proj.weight[:, :, None, None], pool.c_proj.bias), dim=1)
    emb = rn.text_embeddings(["cat", "dog"], templates=["a photo of a {}."])
    expected = torch.einsum("bdhw,kd->bkhw", f, emb)
    torch.testing.assert_close(rn.dense_logits(pixels, emb), expected, rtol=1e-4, atol=1e-5)


def test_positional_embedding_is_resized_bicubically_and_class_row_kept(vit):
    pos = vit.clip.model.visual.positional_embedding.detach()  # (1 + 16, 64)
    out = dense_mod.resize_pos_embed(pos, (3, 6))
    assert out.shape == (1 + 18, 64)
    torch.testing.assert_close(out[0], pos[0])
    grid = pos[1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(3, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[1:], expected.permute(0, 2, 3, 1).reshape(18, 64))
    assert dense_mod.resize_pos_embed(pos, (4, 4)) is pos


# --- text ------------------------------------------------------------------------------------------


def test_text_embeddings_are_normalised_template_means_and_cached(vit):
    templates = ["a photo of a {}.", "a drawing of the {}."]
    emb = vit.text_embeddings(["cat", "dog"], templates=templates)
    model, tok = vit.clip.model, vit.clip.tokenizer
    rows = []
    for name in ["cat", "dog"]:
        f = F.normalize(model.encode_text(tok([t.format(name) for t in templates])).float(), dim=-1)
        rows.append(F.normalize(f.mean(0), dim=0))
    torch.testing.assert_close(emb, torch.stack(rows), rtol=1e-5, atol=1e-6)
    assert vit.text_embeddings(["cat", "dog"], templates=templates) is emb


def test_synonyms_are_averaged_like_templates(vit):
    t = ["a photo of a {}.", "a drawing of the {}."]  # two: each name's template mean is renormalised first
    car, auto = vit.text_embeddings(["car", "automobile"], templates=t)
    both = vit.text_embeddings([("car", "automobile")], templates=t)[0]
    torch.testing.assert_close(both, F.normalize(car + auto, dim=0))


def test_default_templates_are_the_authors_85(vit):
    assert len(vit.templates) == 85
    assert "this is one {} in the scene." in vit.templates and "a photo of a {}." in vit.templates


def test_template_settings_name_sets_files_or_lists(tmp_path):
    assert len(resolve_templates(None)) == len(resolve_templates("maskclip85")) == 85
    imagenet = resolve_templates("imagenet80")
    assert len(imagenet) == 80 and "a photo of a {}." in imagenet and "there is a {} in the scene." not in imagenet
    assert resolve_templates("simple") == ("a photo of a {}.",)
    path = tmp_path / "templates.txt"
    path.write_text("  a {} here.\n\nthe {} there.  \n")
    assert resolve_templates(str(path)) == ("a {} here.", "the {} there.")
    assert resolve_templates(["x {}"]) == ("x {}",)


@pytest.mark.parametrize("spec, message", [
    ("no-such-templates.txt", "not 'maskclip85'"),
    ([], "non-empty"),
    (["a photo of", "x {}", "b", "c", "d"], "a photo of"),
])  # fmt: skip
def test_bad_template_settings_are_refused(spec, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        resolve_templates(spec)


def test_a_template_file_of_blank_lines_is_refused(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match="non-empty"):
        resolve_templates(str(path))


def test_the_refusal_names_at_most_three_bad_templates():
    with pytest.raises(ValueError) as info:
        resolve_templates(["a", "b", "c", "d"])
    assert "'c'" in str(info.value) and "'d'" not in str(info.value)


# --- sizes, windows, modes -------------------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(32, 32), (24, 56), (64, 40)])
def test_vit_any_size_gives_its_grid(vit, h, w):
    emb = vit.text_embeddings(["a", "b", "c", "d"], templates=["{}"])
    assert vit.dense_logits(_pixels(2, h, w), emb).shape == (2, 4, h // 8, w // 8)


def test_resnet_non_square_and_bad_sizes(rn):
    emb = rn.text_embeddings(["a", "b"], templates=["{}"])
    assert rn.dense_logits(_pixels(3, 96, 160), emb).shape == (2, 2, 3, 5)
    with pytest.raises(ValueError, match="multiple of the stride 32"):
        rn.dense_logits(_pixels(3, 100, 160), emb)


def test_window_covering_whole_image_equals_whole_image(vit):
    emb = vit.text_embeddings(["a", "b", "c"], templates=["{}"])
    px = _pixels(4, 48, 64)
    whole = vit.grid_probs(px, emb, SegmentOptions(window=0))
    for win in (64, 128):
        torch.testing.assert_close(vit.grid_probs(px, emb, SegmentOptions(window=win, stride=16)), whole)


def test_sliding_window_averages_overlaps(vit):
    emb = vit.text_embeddings(["a", "b", "c"], templates=["{}"])
    px = _pixels(5, 32, 48)  # windows 32 wide at x = 0 and 16: cells 2..3 are covered twice
    opts = SegmentOptions(window=32, stride=16, key_smoothing=True, prompt_denoising=False)
    got = vit.grid_probs(px, emb, opts)
    left = vit.grid_probs(px[..., :32], emb, opts)
    right = vit.grid_probs(px[..., 16:], emb, opts)
    torch.testing.assert_close(got[..., :2], left[..., :2])
    torch.testing.assert_close(got[..., 2:4], (left[..., 2:] + right[..., :2]) / 2)
    torch.testing.assert_close(got[..., 4:], right[..., 2:])
    assert seg_mod._windows(100, 40, 32, 16) == [
        (y, min(y + 32, 100), x, min(x + 32, 40)) for y in (0, 16, 32, 48, 64, 68) for x in (0, 8)
    ]


def test_sliding_windows_in_two_directions_average_every_window_covering_a_cell(vit):
    emb = vit.text_embeddings(["a", "b", "c"], templates=["{}"])
    px = _pixels(6, 48, 48)  # stride 8: a 6 x 6 grid; windows of 32 at y, x in (0, 16): 4 windows
    opts = SegmentOptions(window=32, stride=16, key_smoothing=True, prompt_denoising=False)
    got = vit.grid_probs(px, emb, opts)
    q = {(y, x): vit.grid_probs(px[..., y : y + 32, x : x + 32], emb, opts) for y in (0, 16) for x in (0, 16)}
    torch.testing.assert_close(got[..., 0, 0], q[0, 0][..., 0, 0])  # one window
    torch.testing.assert_close(got[..., 5, 5], q[16, 16][..., 3, 3])
    torch.testing.assert_close(got[..., 0, 5], q[0, 16][..., 0, 3])
    torch.testing.assert_close(got[..., 5, 0], q[16, 0][..., 3, 0])
    torch.testing.assert_close(got[..., 2, 0], (q[0, 0][..., 2, 0] + q[16, 0][..., 0, 0]) / 2)  # two windows
    four = (q[0, 0][..., 2, 2] + q[0, 16][..., 2, 0] + q[16, 0][..., 0, 2] + q[16, 16][..., 0, 0]) / 4
    torch.testing.assert_close(got[..., 2, 2], four)
    with pytest.raises(ValueError, match="multiples of 8"):
        vit.grid_probs(px, emb, SegmentOptions(window=20, stride=16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vit.grid_probs(px, emb, SegmentOptions(window=32, stride=12))


def test_text_embeddings_keep_the_64_most_recent_vocabularies(vit):
    seg = MaskCLIP(vit.clip, templates="simple")
    assert seg.compiled is False  # eager unless asked
    first = seg.text_embeddings(["word0"])
    for i in range(1, 64):
        seg.text_embeddings([f"word{i}"])
    assert seg.text_embeddings(["word0"]) is first  # 64 kept; reading word0 makes it the newest
    seg.text_embeddings(["word64"])  # 65th: the oldest (word1) goes, word0 stays
    assert seg.text_embeddings(["word0"]) is first
    assert len(seg._text_cache) == 64 and ("word1",) not in {k[0][0] for k in seg._text_cache}


def test_clearclip_is_q_q_attention_without_residual_or_mlp(vit):
    visual = vit.clip.model.visual
    blk = visual.transformer.resblocks[-1]
    x = torch.randn(1, 17, 64)
    q, _, v = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, -1)
    nh = blk.attn.num_heads
    qh, vh = (t.reshape(1, 17, nh, -1).transpose(1, 2) for t in (q, v))
    att = (qh @ qh.transpose(-1, -2) / qh.shape[-1] ** 0.5).softmax(-1)
    expected = blk.attn.out_proj((att @ vh).transpose(1, 2).reshape(1, 17, 64))
    got, _ = dense_mod._last_block(blk, x, "clearclip", (4, 4))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_naclip_neighbourhood_and_modes_differ(vit, rn):
    bias = dense_mod._gaussian_neighbourhood((3, 3), 5.0, "cpu", torch.float32)
    assert (
        bias.shape == (10, 10) and bias[0].abs().sum() == 0 and torch.allclose(bias[1:, 1:].diagonal(), torch.ones(9))
    )
    assert bias[1, 2] > bias[1, 3] > bias[1, 9]  # nearer patches get a larger bias
    emb = vit.text_embeddings(["a", "b", "c"], templates=["{}"])
    px = _pixels(6, 32, 40)
    outs = {m: vit.dense_logits(px, emb, mode=m) for m in dense_mod.DENSE_MODES}
    for m, o in outs.items():
        assert o.shape == (2, 3, 4, 5) and torch.isfinite(o).all(), m
    assert len({tuple(o.flatten()[:5].tolist()) for o in outs.values()}) == 4
    with pytest.raises(ValueError, match="needs a ViT"):
        rn.dense_logits(_pixels(6, 64, 64), rn.text_embeddings(["a"], templates=["{}"]), mode="sclip")


# --- refinements -----------------------------------------------------------------------------------


def test_key_smoothing_averages_over_similar_keys():
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]]).T.reshape(1, 2, 1, 3)  # 3 patches
    same = torch.ones(1, 3, 4)
    out = key_smoothing(probs, same)
    torch.testing.assert_close(out, probs.mean(-1, keepdim=True).expand_as(probs))
    orthogonal = torch.eye(3)[None]
    torch.testing.assert_close(key_smoothing(probs, orthogonal), probs)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 1, 3))


def test_key_smoothing_by_hand_cosine_of_keys_clipped_at_zero_rows_summing_to_one():
    """Keys (1, 0), (3, 3), (0, 2), (-1, 0): cosines 1/sqrt2 between neighbours, 0 or negative (clipped)
    otherwise; lengths do not matter (cosine along the channel axis)."""
    keys = torch.tensor([[[1.0, 0.0], [3.0, 3.0], [0.0, 2.0], [-1.0, 0.0]]])  # (1, 4 patches, C=2)
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 4)
    r2 = math.sqrt(2)
    end, mid = (2 - r2, r2 - 1), (1 - 1 / r2, r2 - 1)  # weights (self, neighbour): 1 / (1 + 1/r2), ...
    expected = torch.tensor(
        [
            [end[0], end[1]],  # patch 0: itself (class 0) and patch 1 (class 1)
            [2 * mid[0], mid[1]],  # patch 1: patches 0 and 2 (class 0) and itself (class 1)
            [end[0], end[1]],  # patch 2: itself (class 0) and patch 1 (class 1)
            [0.0, 1.0],  # patch 3: opposite to patch 0, orthogonal to 2: only itself
        ]
    ).T.reshape(1, 2, 1, 4)
    torch.testing.assert_close(key_smoothing(probs, keys), expected, rtol=1e-6, atol=1e-6)


def test_probabilities_are_softmax_of_temperature_times_cosine(vit):
    emb = vit.text_embeddings(["cat", "dog", "tree"], templates=["{}"])
    px = _pixels(8, 32, 32)
    cos = vit.dense_logits(px, emb, mode="maskclip")
    assert SegmentOptions().temperature == 100.0
    for t in (100.0, 7.0):
        opts = SegmentOptions(temperature=t, key_smoothing=False, prompt_denoising=False)
        torch.testing.assert_close(vit.grid_probs(px, emb, opts), (t * cos).softmax(1), rtol=1e-5, atol=1e-6)


def test_prompt_denoising_removes_classes_whose_peak_is_below_half():
    probs = torch.tensor([[0.6, 0.2], [0.3, 0.2], [0.1, 0.6]]).reshape(1, 3, 1, 2)  # class 1 peaks at 0.3
    out = prompt_denoising(probs)
    assert torch.all(out[0, 1] == 0)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 1, 2))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([6 / 7, 0.0, 1 / 7]))
    flat = torch.full((1, 4, 2, 2), 0.25)  # every class below 0.5: the best one is kept
    assert (prompt_denoising(flat).flatten(2).amax(-1) > 0).sum() == 1


def test_pamr_refinement_runs_on_the_resized_image_in_the_same_batch(vit, monkeypatch):
    from labelstudio_maskclip.engine.refine import pamr

    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(2)]
    opts = SegmentOptions(short_side=32, refine="pamr", key_smoothing=False, prompt_denoising=False)
    calls = []
    monkeypatch.setattr(seg_mod, "pamr", lambda image, probs: calls.append(len(image)) or pamr(image, probs))
    out = vit.segment(images, ["cat", "dog"], opts=opts)
    size = vit.input_size(40, 56, 32)
    assert calls == [2] and size == (32, 48)  # one call for the batch of two
    pixels = vit.preprocess(images, size)
    expected = pamr(pixels, vit.grid_probs(pixels, vit.text_embeddings(["cat", "dog"]), opts))
    for r, e in zip(out, expected):
        assert r.grid_probs.shape == (2, 32, 48) and r.labels.shape == (40, 56)
        np.testing.assert_allclose(r.grid_probs, e.numpy(), rtol=1e-5, atol=1e-6)
    plain = vit.segment(images[:1], ["cat", "dog"], opts=dataclasses.replace(opts, refine="none"))[0]
    assert plain.grid_probs.shape == (2, 4, 6)
    monkeypatch.setattr(seg_mod, "REFINE_MAX_SIDE", 24)  # the refined resolution is capped
    assert vit.segment(images[:1], ["cat", "dog"], opts=opts)[0].grid_probs.shape == (2, 16, 24)
    with pytest.raises(ValueError, match="refinement"):
        vit.segment(images, ["cat"], opts=dataclasses.replace(opts, refine="crf"))


def test_refine_setting_reaches_the_engine():
    from labelstudio_maskclip.models import segment_options
    from labelstudio_maskclip.settings import Settings, SettingsError

    assert segment_options(Settings()).refine == "pamr"  # the default preset, naclip, is published with PAMR
    assert segment_options(Settings(preset="sclip")).refine == "none"
    assert segment_options(Settings.from_env({"MASKCLIP_REFINE": "none"})).refine == "none"  # overrides naclip
    assert segment_options(Settings.from_env({"MASKCLIP_PRESET": "sclip", "MASKCLIP_REFINE": "pamr"})).refine == "pamr"
    with pytest.raises(SettingsError, match="MASKCLIP_REFINE"):
        Settings.from_env({"MASKCLIP_REFINE": "crf"})


# --- segmentation output ---------------------------------------------------------------------------


def test_segment_outputs_at_original_size_with_consistent_scores(vit):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)]
    out = vit.segment(images, ["cat", "dog", "tree"], opts=SegmentOptions(short_side=32))
    for img, r in zip(images, out):
        assert r.labels.shape == img.shape[:2] and r.confidence.shape == img.shape[:2]
        assert r.class_areas.sum() == (r.labels >= 0).sum() == img.shape[0] * img.shape[1]
        for k in range(3):
            m = r.mask(k)
            assert r.class_areas[k] == m.sum()
            expected = r.confidence[m].mean() if m.any() else 0.0
            assert r.class_scores[k] == pytest.approx(expected, rel=1e-4)
        assert r.score == pytest.approx(r.confidence.mean(), rel=1e-4)
        assert r.probabilities().shape == (3,) + img.shape[:2]
        np.testing.assert_array_equal(r.probabilities().argmax(0), r.labels)


def test_background_and_low_confidence_pixels_get_no_label(vit):
    img = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    opts = SegmentOptions(short_side=32, key_smoothing=False, prompt_denoising=False)
    with_bg = vit.segment([img], ["cat"], background=["sky", "wall", "floor"], opts=opts)[0]
    probs = with_bg.probabilities()
    np.testing.assert_array_equal(with_bg.labels == NO_LABEL, probs.argmax(0) > 0)
    strict = vit.segment([img], ["cat", "dog"], opts=SegmentOptions(short_side=32, min_confidence=0.99))[0]
    assert (strict.labels[strict.confidence < 0.99] == NO_LABEL).all()
    assert (strict.labels[strict.confidence >= 0.99] >= 0).all()


def test_upsampling_in_class_chunks_equals_one_shot(vit, monkeypatch):
    probs = torch.rand(7, 5, 6).softmax(0)
    one = seg_mod._finalize(probs, (50, 61), 7, 0.0)
    monkeypatch.setattr(seg_mod, "_UPSAMPLE_BUDGET", 50 * 61 * 2)  # 2 classes per interpolate call
    chunked = seg_mod._finalize(probs, (50, 61), 7, 0.0)
    np.testing.assert_array_equal(one.labels, chunked.labels)
    np.testing.assert_array_equal(one.confidence, chunked.confidence)


def test_size_buckets_put_similar_shapes_in_one_batch_with_small_distortion():
    sizes = [(480, 640 + d) for d in range(-64, 200, 4)]  # aspect ratios 1.2 to 1.75
    exact = {seg_mod.resized_size(h, w, 448, 16) for h, w in sizes}
    buckets = {seg_mod.resized_size(h, w, 448, 16, 64) for h, w in sizes}
    assert len(buckets) <= len(exact) // 3
    for h, w in sizes:
        rh, rw = seg_mod.resized_size(h, w, 448, 16, 64)
        assert rh == 448 and rw % 64 == 0  # the short side keeps its size; the long side goes in 64 px steps
        assert abs((rw / rh) / (w / h) - 1) <= 0.072
    assert seg_mod.resized_size(640, 480, 448, 16, 64) == (576, 448)  # portrait: the height is the long side
    assert seg_mod.resized_size(480, 640, 448, 14, 64) == (448, 630)  # ViT-*/14: long side in steps of 70
    assert seg_mod.resized_size(480, 640, 448, 16) == (448, 592)  # stride only


def test_batches_of_mixed_sizes_equal_one_by_one(vit):
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(40, 60, 3), (60, 40, 3), (40, 60, 3)]]
    opts = SegmentOptions(short_side=32, batch_size=8)
    together = vit.segment(images, ["a", "b"], opts=opts)
    for img, r in zip(images, together):
        alone = vit.segment([img], ["a", "b"], opts=opts)[0]
        np.testing.assert_allclose(r.grid_probs, alone.grid_probs, atol=1e-5)


# --- loading ---------------------------------------------------------------------------------------


def test_saved_state_file_loads_identical_weights(weights):
    a = MaskCLIP.load(model=TINY_VIT, pretrained=str(weights), device="cpu")
    b = MaskCLIP.load(model=TINY_VIT, pretrained=str(weights), device="cpu")
    px = _pixels(7, 32, 32)
    emb = a.text_embeddings(["x"], templates=["{}"])
    torch.testing.assert_close(a.dense_logits(px, emb), b.dense_logits(px, emb))
    assert a.version == "MaskCLIP-Tiny-ViT.tiny_vit.pt"


def test_random_weights_need_explicit_permission():
    with pytest.raises(WeightsError, match="MASKCLIP_ALLOW_RANDOM"):
        MaskCLIP.load(model=TINY_VIT, pretrained="random", device="cpu")
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        random = MaskCLIP.load(model=TINY_VIT, pretrained="random", device="cpu", allow_random=True)
    assert random.version == "MaskCLIP-Tiny-ViT.random"  # a tag without a path: the tag itself


def test_missing_checkpoint_names_the_setting(tmp_path):
    with pytest.raises(WeightsError, match="MASKCLIP_PRETRAINED=/path/to/file"):
        MaskCLIP.load(model="ViT-B-16", pretrained=str(tmp_path / "nope.pt"), device="cpu")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="MASKCLIP_PRETRAINED"):
        MaskCLIP.load(model=TINY_VIT, pretrained=str(bad), device="cpu")


def test_bf16_path_agrees_with_fp32(weights):
    """The GPU's default precision, exercised on the CPU: same shapes and dtypes out, close values."""
    fp32 = MaskCLIP.load(model=TINY_VIT, pretrained=str(weights), device="cpu", precision="fp32")
    bf16 = MaskCLIP.load(model=TINY_VIT, pretrained=str(weights), device="cpu", precision="bf16")
    assert bf16.clip.dtype == torch.bfloat16
    classes = ["cat", "dog", "tree", "sky"]
    emb32, emb16 = fp32.text_embeddings(classes), bf16.text_embeddings(classes)
    assert emb16.dtype == torch.float32 and (emb32 - emb16).abs().max() < 0.05
    px = _pixels(8, 48, 64)
    a, b = fp32.dense_logits(px, emb32), bf16.dense_logits(px, emb32)
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.05
    img = np.random.default_rng(3).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    opts = SegmentOptions(short_side=48)
    r32, r16 = fp32.segment([img], classes, opts=opts)[0], bf16.segment([img], classes, opts=opts)[0]
    assert (r32.labels == r16.labels).mean() > 0.9


def test_load_clip_directly_refuses_random_weights_by_default_and_records_what_it_loaded(weights):
    with pytest.raises(WeightsError, match="MASKCLIP_ALLOW_RANDOM"):
        load_clip(TINY_VIT, "random", "cpu")
    clip = load_clip(TINY_VIT, f"  {weights}  ", "cpu")  # space around a setting is ignored
    assert clip.name == "MaskCLIP-Tiny-ViT" and clip.pretrained == str(weights)
    assert clip.device == torch.device("cpu") and clip.dtype == torch.float32
    assert not clip.model.training and not any(p.requires_grad for p in clip.model.parameters())
    # open_clip's default normalisation (OpenAI's statistics), each channel its own value
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert clip.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    assert clip.tokenizer(["a cat"]).shape[0] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        clip.name = "other"  # type: ignore[misc]
    with pytest.warns(UserWarning):
        rand = load_clip(TINY_VIT, "none", "cpu", allow_random=True)
    assert rand.pretrained == "random"


def test_devices_and_precisions_resolve_as_documented():
    assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")  # no CUDA on this machine
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")).type == "cpu"
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) in (torch.bfloat16, torch.float16)  # bf16 where supported
    assert (resolve_dtype("fp32", torch.device("cpu")), resolve_dtype("bf16", torch.device("cpu")),
            resolve_dtype("fp16", torch.device("cpu"))) == (torch.float32, torch.bfloat16, torch.float16)  # fmt: skip


def test_a_model_config_is_a_json_file_else_a_name(tmp_path):
    not_json = tmp_path / "config.txt"
    not_json.write_text("{}")
    assert loading_mod._register_config_file(str(not_json)) == str(not_json)
    assert loading_mod._register_config_file(str(tmp_path / "missing.json")) == str(tmp_path / "missing.json")
    assert loading_mod._register_config_file("ViT-B-16") == "ViT-B-16"
    assert loading_mod._register_config_file(TINY_VIT) == "MaskCLIP-Tiny-ViT"


def test_an_unknown_file_lists_the_architectures_tags(tmp_path):
    with pytest.raises(WeightsError, match=r"Known tags: \[.*'openai'"):
        load_clip("ViT-B-16", str(tmp_path / "nope.pt"), "cpu")
    with pytest.raises(WeightsError, match="Known tags: none"):
        load_clip(TINY_VIT, str(tmp_path / "nope.pt"), "cpu")


def test_documented_defaults():
    opts = SegmentOptions()
    assert (opts.short_side, opts.size_multiple, opts.max_input_pixels, opts.window, opts.stride) == (448, 0, 0, 0, 224)
    assert opts.key_smoothing and opts.prompt_denoising and opts.refine == "none"
    assert (opts.temperature, opts.min_confidence, opts.batch_size, opts.score) == (100.0, 0.0, 16, "confidence")
    assert seg_mod.REFINE_MAX_SIDE == 896  # PAMR's resolution cap (README, docs/method.md)


def test_segmentation_lists_present_labels_their_masks_and_full_size_probabilities():
    probs = torch.zeros(3, 2, 2)
    probs[0, :, 0] = 1.0  # label 0 on the left, label 2 on the right, label 1 nowhere
    probs[2, :, 1] = 1.0
    seg = seg_mod._finalize(probs, (4, 6), 3, 0.0)
    assert seg.present == [0, 2]
    masks = seg.masks()
    assert sorted(masks) == [0, 2] and masks[0][:, :2].all() and not masks[0][:, 4:].any()
    full = seg.probabilities()
    assert full.shape == (3, 4, 6) and full.dtype == np.float32
    np.testing.assert_allclose(full[0, :, 0], 1.0) and np.testing.assert_allclose(full[2, :, 5], 1.0)


def test_a_long_strip_is_capped_to_the_pixel_budget_and_exactly_four_to_one_is_not():
    assert seg_mod.resized_size(100, 400, 448, 16) == (448, 1792)  # 4:1 at short side 448: untouched
    h, w = seg_mod.resized_size(100, 500, 448, 16)  # 5:1 would be 448 x 2240, over 4 x 448^2
    assert (h, w) == (400, 2000) and h * w <= 4 * 448 * 448
    assert seg_mod.resized_size(500, 500, 400, 16, 64) == (400, 384)  # a square's width gets the coarse step


def test_images_are_scaled_to_one_resized_antialiased_and_normalised():
    mean = torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.5, 1.0]).view(1, 3, 1, 1)
    white = np.full((8, 8, 3), 255, np.uint8)
    out = seg_mod.normalized_batch([white], (4, 4), mean, std)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([2.0, 1.5, 1.0]))  # (1 - mean) / std
    checker = ((np.indices((16, 16)).sum(0) % 2) * 255).astype(np.uint8)[:, :, None].repeat(3, 2)
    grey = seg_mod.normalized_batch([checker], (4, 4), torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    torch.testing.assert_close(grey, torch.full((1, 3, 4, 4), 0.5), atol=0.01, rtol=0)  # averaged, not sampled
    ramp = np.tile(np.arange(0, 256, 32, dtype=np.uint8)[None, :, None], (2, 1, 3))  # (2, 8, 3)
    up = seg_mod.normalized_batch([ramp], (2, 16), torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(ramp).permute(2, 0, 1)[None].float() / 255, size=(2, 16), mode="bilinear",
        antialias=True, align_corners=False,
    )  # fmt: skip
    torch.testing.assert_close(up, expected)
    # pixel centres (align_corners=False): output 0 clamps to input 0, output 1 is a quarter of the way to input 1
    assert up[0, 0, 0, 0] == 0.0 and float(up[0, 0, 0, 1]) == pytest.approx(0.25 * 32 / 255, abs=1e-6)


@pytest.mark.parametrize("grid", [(9, 1), (1, 9), (1, 1)])
def test_one_cell_wide_grids_finish_like_the_plain_upsampling(grid):
    gen = torch.Generator().manual_seed(sum(grid))
    probs = (torch.randn(5, *grid, generator=gen) * 3).softmax(0)  # 5 classes: the candidate shortcut runs
    seg = seg_mod._finalize(probs, (18, 11), 5, 0.0)
    best, label = torch.nn.functional.interpolate(probs[None], size=(18, 11), mode="bilinear")[0].max(0)
    assert (seg.labels == label.numpy()).mean() > 0.999
    np.testing.assert_allclose(seg.confidence, best.numpy(), atol=1e-6)


def test_the_model_normalises_pixels_with_its_own_statistics(vit):
    x = torch.rand(2, 3, 4, 5)
    mean = torch.tensor(vit.clip.mean).view(1, 3, 1, 1)
    std = torch.tensor(vit.clip.std).view(1, 3, 1, 1)
    torch.testing.assert_close(vit.normalize(x), (x - mean) / std)


def test_batching_refuses_what_is_not_rgb_and_reports_progress_per_batch():
    probs_of = lambda batch, size: torch.full((len(batch), 2, 2, 2), 0.5)  # noqa: E731
    size_of = lambda h, w: (16, 16)  # noqa: E731
    for bad in (np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32)):
        with pytest.raises(ValueError, match=r"expected \(H, W, 3\) uint8 RGB"):
            seg_mod.segment_in_batches([bad], size_of, probs_of, n_labels=2, batch_size=2, min_confidence=0.0)
    done = []
    images = [np.zeros((4, 4, 3), np.uint8)] * 5
    out = seg_mod.segment_in_batches(
        images, size_of, probs_of, n_labels=2, batch_size=2, min_confidence=0.0, progress=done.append
    )
    assert len(out) == 5 and done == [2, 2, 1]
