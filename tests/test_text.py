"""The frozen open_clip text encoder (varctl/text.py): values against open_clip, masks, null text, errors."""

import time

import open_clip
import pytest
import torch

from varctl.models.text import TextEncoder
from varctl.models.var import TextCondition

TINY_TEXT = {"width": 32, "heads": 2, "layers": 2, "context_length": 16}
TINY_VISION = {"image_size": 32, "patch_size": 32, "width": 64, "layers": 1, "head_width": 64}
CAPTIONS = ["a red circle", "", "a big blue square at the top left on a plain green background, and more"]


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A tiny open_clip CLIP and its weights as a local file (stands in for downloaded pretrained weights)."""
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32", embed_dim=24, vision_cfg=TINY_VISION, text_cfg=TINY_TEXT).eval()
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(clip.state_dict(), path)
    return clip, str(path)


def _from_file(path, **kw):
    return TextEncoder(
        "ViT-B-32",
        pretrained=path,
        model_cfg={"embed_dim": 24, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT},
        **kw,
    )


def test_outputs_match_open_clip(clip_file):
    clip, path = clip_file
    enc = _from_file(path)
    out = enc(CAPTIONS)
    assert isinstance(out, TextCondition)
    assert (
        out.pooled_BE.shape == (3, 24)
        and out.tokens_BTE.shape == (3, 16, 32)
        and out.mask_BT.shape == (3, 16)
    )
    assert enc.width == 32 and enc.embed_dim == 24
    ids = open_clip.get_tokenizer("ViT-B-32", context_length=16)(CAPTIONS)
    with torch.no_grad():
        ref = clip.encode_text(ids)
    torch.testing.assert_close(out.pooled_BE, ref, rtol=1e-5, atol=1e-5)
    # tokens are the ln_final features: pooling them at EOT and projecting gives the pooled embedding
    eot = ids.argmax(dim=-1)
    torch.testing.assert_close(
        out.tokens_BTE[torch.arange(3), eot] @ clip.text_projection, ref, rtol=1e-5, atol=1e-5
    )
    assert not torch.allclose(out.pooled_BE[0], out.pooled_BE[2])


def test_mask_marks_real_tokens_including_eot(clip_file):
    enc = _from_file(clip_file[1])
    ids, mask = enc.tokenize(["a red circle", "", "two  words"])
    assert mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [5, 2, 4]  # start, words, end-of-text
    assert ids[0, 4].item() == enc.tokenizer.eot_token_id
    assert mask.equal(ids != 0)  # padding id 0 (defined by the EOT position: id 0 is also the word "!")
    assert enc(["a red circle"]).mask_BT.equal(mask[:1])
    _, long_mask = enc.tokenize([CAPTIONS[2]])  # truncated: every position real, EOT last
    assert long_mask.all()


def test_shorter_context_gives_the_same_features(clip_file):
    full, short = _from_file(clip_file[1]), _from_file(clip_file[1], context_length=8)
    a, b = full(["a red circle"]), short(["a red circle"])
    assert b.tokens_BTE.shape == (1, 8, 32)
    torch.testing.assert_close(a.tokens_BTE[:, :8], b.tokens_BTE, rtol=1e-5, atol=1e-5)  # causal attention
    torch.testing.assert_close(a.pooled_BE, b.pooled_BE, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="context_length"):
        _from_file(clip_file[1], context_length=40)


def test_empty_is_the_empty_caption_and_encoder_is_frozen(clip_file):
    enc = _from_file(clip_file[1])
    null, batch = enc.empty(), enc(["a red circle", ""])
    assert null.pooled_BE.shape == (1, 24)
    torch.testing.assert_close(null.pooled_BE[0], batch.pooled_BE[1], rtol=1e-5, atol=1e-5)
    assert null.mask_BT.sum().item() == 2
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    assert not enc(["x"]).pooled_BE.requires_grad


def test_random_weights_with_tiny_config_warn():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        enc = TextEncoder("ViT-B-32", pretrained=None, model_cfg={"embed_dim": 16, "text_cfg": TINY_TEXT})
    out = enc(["a", "b"])
    assert out.pooled_BE.shape == (2, 16) and torch.isfinite(out.tokens_BTE).all()
    assert not hasattr(enc, "visual")


def test_missing_pretrained_fails_fast_naming_the_setting(tmp_path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"text_encoder\.pretrained='openai'.*not in the cache"):
        TextEncoder("ViT-B-32", pretrained="openai")  # HF_HUB_OFFLINE=1 (conftest): not in the cache
    assert time.perf_counter() - start < 10
    with pytest.raises(FileNotFoundError, match=r"model\.text_encoder\.pretrained=.*file not found"):
        TextEncoder("ViT-B-32", pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="not a known open_clip tag.*openai"):
        TextEncoder("ViT-B-32", pretrained="no_such_tag")
    with pytest.raises(ValueError, match=r"model\.text_encoder\.name='ViT-Nope'"):
        TextEncoder("ViT-Nope", pretrained=None)
    # a local file of another model is open_clip's error, not "not in the cache", offline too
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    tiny = {"embed_dim": 16, "text_cfg": TINY_TEXT}
    with pytest.raises(RuntimeError, match=r"(?s)other\.pt': open_clip could not load.*Missing key") as e:
        TextEncoder("ViT-B-32", pretrained=str(tmp_path / "other.pt"), model_cfg=tiny)
    assert not isinstance(e.value, FileNotFoundError)
