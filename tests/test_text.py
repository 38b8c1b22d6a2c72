"""The text side's speed lever: encoding on the context cut after the batch's last EOT token gives
open_clip's own ``encode_text`` numbers."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from labelstudio_maskclip.engine.text import encode_classes, encode_prompts, encode_text_trimmed, maskclip_templates


@pytest.fixture(scope="module")
def b16():
    """ViT-B/16 with random weights: the architecture users run, its real 77-token context."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16").eval()
    return model, open_clip.get_tokenizer("ViT-B-16")


def test_trimmed_encoding_equals_open_clips_encode_text(b16):
    model, tok = b16
    prompts = ["a photo of a car.", "a", "there is the fire hydrant with a long name in the scene.", "x " * 30]
    tokens = tok(prompts)
    with torch.no_grad():
        want = model.encode_text(tokens)
        got = encode_text_trimmed(model, tokens)
    assert int(tokens.argmax(-1).max()) + 1 < 77  # the batch is really cut
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_encoded_prompts_keep_their_order_across_sorted_batches(b16):
    model, tok = b16
    prompts = [t.format(n) for n in ("car", "traffic light", "a") for t in maskclip_templates()[:20]]
    with torch.no_grad():
        want = F.normalize(model.encode_text(tok(prompts)).float(), dim=-1)
    got = encode_prompts(model, tok, prompts, torch.device("cpu"), chunk=7)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_class_embeddings_equal_the_untrimmed_computation(b16):
    model, tok = b16
    templates = maskclip_templates()
    classes = (("car", "automobile"), ("road",))
    got = encode_classes(model, tok, classes, templates, torch.device("cpu"))
    with torch.no_grad():
        rows = []
        for names in classes:
            per_name = [F.normalize(F.normalize(model.encode_text(tok([t.format(n) for t in templates])), dim=-1)
                                    .mean(0), dim=-1) for n in names]  # fmt: skip
            rows.append(F.normalize(torch.stack(per_name).mean(0), dim=-1))
    assert (torch.stack(rows) - got).abs().max() < 1e-5
