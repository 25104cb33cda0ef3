"""The text condition of a text-conditioned VAR: ``TextCondition`` (what the VAR takes) and ``TextEncoder``
(a frozen open_clip text tower that makes it from captions).

For each caption it returns open_clip's pooled text embedding (``encode_text``) and the per-token features
after the final LayerNorm (before pooling and projection), with a mask of the real tokens (start, words and
end-of-text; padding excluded). Legend: B batch, T text tokens, E feature width.

Weights: ``pretrained`` is an open_clip tag (``"openai"``, ``"laion2b_s34b_b79k"``: read from open_clip's
own cache, downloaded there when the machine is online), a local file (``.safetensors``/``.bin``/``.pt``),
or ``None`` for random weights (tests and the offline demo only). Small towers for tests and demos: pass
``model_cfg`` overrides merged into the named architecture, e.g.
``{"embed_dim": 64, "text_cfg": {"width": 64, "heads": 2, "layers": 2, "context_length": 24}}``, or
register a whole architecture file with ``open_clip.add_model_config("my_tiny.json")`` and use its name.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class TextCondition(NamedTuple):
    """A text condition from a frozen encoder: pooled (B, E), tokens (B, T, E), mask (B, T) (True: real)."""

    pooled_BE: torch.Tensor
    tokens_BTE: torch.Tensor
    mask_BT: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.pooled_BE.shape[0]

    def to(self, device: torch.device) -> TextCondition:
        return TextCondition(*(t.to(device) for t in self))

    def padded(self, T: int) -> TextCondition:
        """Tokens padded (masked out) to length T."""
        pad = T - self.tokens_BTE.shape[1]
        if pad <= 0:
            return self
        return TextCondition(
            self.pooled_BE,
            F.pad(self.tokens_BTE, (0, 0, 0, pad)),
            F.pad(self.mask_BT.bool(), (0, pad), value=False),
        )

    def expand(self, B: int) -> TextCondition:
        """A batch-1 condition repeated B times (views)."""
        p, t, m = self
        return TextCondition(p.expand(B, -1), t.expand(B, -1, -1), m.expand(B, -1))

    def cat(self, other: TextCondition) -> TextCondition:
        T = max(self.tokens_BTE.shape[1], other.tokens_BTE.shape[1])
        a, b = self.padded(T), other.padded(T)
        return TextCondition(*(torch.cat((x, y)) for x, y in zip(a, b)))

    def where(self, take_other_B: torch.Tensor, other: TextCondition) -> TextCondition:
        """Per sample: ``other`` where ``take_other_B`` else self (condition dropping)."""
        T = max(self.tokens_BTE.shape[1], other.tokens_BTE.shape[1])
        a, b = self.padded(T), other.padded(T)
        s = take_other_B
        return TextCondition(
            torch.where(s[:, None], b.pooled_BE, a.pooled_BE),
            torch.where(s[:, None, None], b.tokens_BTE, a.tokens_BTE),
            torch.where(s[:, None], b.mask_BT.bool(), a.mask_BT.bool()),
        )


PRETRAINED_KEY = "model.text_encoder.pretrained"

# With random weights the image tower is thrown away, so it is built as small as open_clip allows.
_TINY_VISION = {"image_size": 32, "patch_size": 32, "width": 64, "layers": 1, "head_width": 64}


def _merge(base: dict, *overrides: dict) -> dict:
    """Nested dicts merged key by key, later ones winning (omegaconf, imported here: optional for models)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.merge(base, *overrides))


def _load_clip(
    name: str, pretrained: str | None, model_cfg: dict | None, context_length: int | None, cache_dir
):
    """Build the open_clip model; errors name the config key and say what to do."""
    import open_clip

    if name not in open_clip.list_models():
        raise ValueError(
            f"model.text_encoder.name={name!r} is not an open_clip architecture; known: "
            f"{', '.join(open_clip.list_models()[:12])}, ... (open_clip.list_models())"
        )
    cfg = open_clip.get_model_config(name)
    kwargs = {}
    if pretrained is None:
        warnings.warn(
            f"{PRETRAINED_KEY}=null: the {name} text encoder has RANDOM weights (tests/demo only): its "
            f"features tell captions apart but carry no language knowledge",
            stacklevel=3,
        )
        cfg = _merge(cfg, {"vision_cfg": _TINY_VISION})
        if context_length is not None:
            cfg = _merge(cfg, {"text_cfg": {"context_length": context_length}})
    if model_cfg:
        cfg = _merge(cfg, model_cfg)
    if pretrained is None or model_cfg:
        kwargs = {k: cfg[k] for k in ("embed_dim", "vision_cfg", "text_cfg") if k in cfg}
    if pretrained is not None and not open_clip.get_pretrained_cfg(name, pretrained):
        looks_like_path = os.sep in pretrained or pretrained.endswith((".safetensors", ".bin", ".pt", ".pth"))
        if not os.path.isfile(pretrained):
            what = "file not found" if looks_like_path else "not a known open_clip tag for this architecture"
            raise FileNotFoundError(
                f"{PRETRAINED_KEY}={pretrained!r}: {what}. Tags for {name}: "
                f"{open_clip.list_pretrained_tags_by_model(name)}; or give a local weights file; or set "
                f"{PRETRAINED_KEY}=null for random weights (demo only)"
            )
    try:
        model = open_clip.create_model(
            name,
            pretrained=pretrained,
            device="cpu",
            cache_dir=cache_dir,
            require_pretrained=pretrained is not None,
            **kwargs,
        )
    except RuntimeError as e:
        if not _missing_file(e):  # a file of another model, a damaged one: open_clip's reason
            said = str(e) if len(str(e)) <= 400 else f"{str(e)[:400]} ..."  # not every missing key
            message = f"{PRETRAINED_KEY}={pretrained!r}: open_clip could not load {name!r}: {said}"
            raise RuntimeError(message) from e
        # weights missing from the cache (offline) or not downloadable: a config error
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise FileNotFoundError(
            f"{PRETRAINED_KEY}={pretrained!r}: could not load open_clip weights for {name!r}"
            f"{' (HF_HUB_OFFLINE is set and they are not in the cache)' if offline else ''}. Download them "
            f"once on a machine with network into open_clip's cache (cache_dir={cache_dir!r}, default the "
            f"Hugging Face cache), or set {PRETRAINED_KEY} to a local weights file, or to null for random "
            f"weights (demo only). open_clip said: {e}"
        ) from e
    return model


def _missing_file(error: BaseException | None) -> bool:
    """Whether ``error`` or an exception it was raised from is a missing file (huggingface_hub's
    LocalEntryNotFoundError, offline, is one)."""
    while error is not None:
        if isinstance(error, FileNotFoundError):
            return True
        error = error.__cause__ or error.__context__
    return False


class TextEncoder(nn.Module):
    """A frozen open_clip text tower: ``encoder(captions) -> TextCondition(pooled, tokens, mask)``."""

    def __init__(
        self,
        name: str = "ViT-B-32",
        pretrained: str | None = "openai",
        context_length: int | None = None,
        model_cfg: dict | None = None,
        cache_dir: str | None = None,
    ):
        super().__init__()
        import open_clip

        clip = _load_clip(name, pretrained, model_cfg, context_length, cache_dir)
        # CLIP keeps the text tower's parts on itself; CustomTextCLIP keeps a TextTransformer in `.text`.
        tower = clip if hasattr(clip, "token_embedding") else getattr(clip, "text", None)
        if tower is None or not hasattr(tower, "ln_final") or getattr(tower, "cls_emb", None) is not None:
            raise ValueError(
                f"model.text_encoder.name={name!r}: only open_clip text towers with a plain causal "
                f"transformer are supported (CLIP ViT/RN/ConvNeXt models), not "
                f"{type(getattr(clip, 'text', clip)).__name__}"
            )
        if tower.attn_mask is None:
            raise ValueError(
                f"model.text_encoder.name={name!r}: the text tower has no causal mask (unsupported)"
            )
        self.name, self.pretrained = name, pretrained
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.register_buffer("attn_mask", tower.attn_mask.clone(), persistent=False)
        self.pool_type = getattr(tower, "text_pool_type", None) or tower.pool_type
        self.eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        model_len = self.positional_embedding.shape[0]
        self.context_length = context_length or model_len
        if self.context_length > model_len:
            raise ValueError(
                f"model.text_encoder.context_length={context_length} exceeds the {name} tower's {model_len}"
            )
        self.tokenizer = open_clip.get_tokenizer(name, context_length=self.context_length)
        if not hasattr(self.tokenizer, "eot_token_id"):
            raise ValueError(f"model.text_encoder.name={name!r}: expected open_clip's CLIP BPE tokenizer")
        self.requires_grad_(False)
        self.eval()
        del clip  # the image tower is dropped with it

    @property
    def width(self) -> int:
        """E of ``tokens_BTE``."""
        return self.ln_final.weight.shape[0]

    @property
    def embed_dim(self) -> int:
        """E of ``pooled_BE``."""
        if self.text_projection is None:
            return self.width
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection.out_features
        return self.text_projection.shape[1]

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout and friends stay off whatever the parent does

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) and the mask of real tokens (B, T): everything up to and including end-of-text."""
        ids_BT = self.tokenizer(list(captions)).to(self.attn_mask.device)
        is_eot = ids_BT == self.tokenizer.eot_token_id
        # positions after the first end-of-text are padding (id 0, which is also a real word: "!")
        mask_BT = (is_eot.cumsum(dim=1) - is_eot.long()) == 0
        return ids_BT, mask_BT

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> TextCondition:
        from open_clip.transformer import text_global_pool

        if isinstance(captions, str):
            raise TypeError("TextEncoder expects a list of captions, found one string")
        ids_BT, mask_BT = self.tokenize(captions)
        T = ids_BT.shape[1]
        # Attention is causal, so a context shorter than the tower's gives the same features on its positions.
        x_BTE = self.token_embedding(ids_BT) + self.positional_embedding[:T]
        x_BTE = self.transformer(x_BTE, attn_mask=self.attn_mask[:T, :T])
        tokens_BTE = self.ln_final(x_BTE)
        pooled_BE = text_global_pool(tokens_BTE, ids_BT, self.pool_type, eos_token_id=self.eos_id)
        if isinstance(self.text_projection, nn.Linear):
            pooled_BE = self.text_projection(pooled_BE)
        elif self.text_projection is not None:
            pooled_BE = pooled_BE @ self.text_projection
        return TextCondition(pooled_BE.float(), tokens_BTE.float(), mask_BT)

    encode = forward

    def empty(self) -> TextCondition:
        """The null condition: the encoding of the empty caption "" (batch of one)."""
        return self([""])
