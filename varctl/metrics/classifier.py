"""Class agreement of generated images: a small CNN trained on the real labelled images judges samples.

A class-conditional generator is only useful if a sample of class c looks like class c. Without pretrained
Inception weights (none on a fresh machine), varctl measures this with a classifier trained on the same
data's real images: its accuracy on real validation images is the ceiling, chance is 1 / num_classes, and
its accuracy on samples (the label each was generated for as the target) says how often samples show their
class. Used by ``tools/score_samples.py``; any dataset yielding ``{"image": (3,H,W) in [-1,1], "label"}``
(the datamodules' convention; generated images in [0, 1] are mapped with ``x * 2 - 1`` first).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from varctl.files import atomic_save, torch_load


class SmallClassifier(nn.Module):
    """Four stride-2 conv blocks (BatchNorm, GELU), global average pooling, a linear head (sizes >= 16)."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.GELU(),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.GELU(),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], num_classes)
        self.num_classes, self.width = int(num_classes), int(width)

    def forward(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> logits (B, num_classes)."""
        return self.head(self.features(images_B3HW).mean((2, 3)))


def stack_dataset(dataset: Dataset, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `num` items of a labelled dataset as (images (N,3,H,W), labels (N,)), each item read once."""
    items = [dataset[i] for i in range(min(num, len(dataset)))]
    return torch.stack([it["image"] for it in items]), torch.tensor([int(it["label"]) for it in items])


def colour_jitter(images_B3HW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image: shuffle and maybe negate the colour channels, then scale and shift each one (clamped to
    [-1, 1]). The classifier then judges the shape, not the colours, which a young tokenizer gets wrong."""
    B = images_B3HW.shape[0]
    perm_B3 = torch.rand(B, 3, generator=generator).argsort(1)
    x = images_B3HW.gather(1, perm_B3[:, :, None, None].expand_as(images_B3HW))
    sign = torch.where(torch.rand(B, 3, 1, 1, generator=generator) < 0.5, -1.0, 1.0)
    scale = 0.4 + 0.6 * torch.rand(B, 3, 1, 1, generator=generator)
    shift = 0.6 * (torch.rand(B, 3, 1, 1, generator=generator) - 0.5)
    return (x * sign * scale + shift).clamp_(-1, 1)


def train_classifier(
    train: Dataset,
    num_classes: int,
    steps: int = 1500,
    batch_size: int = 64,
    num_images: int = 8000,
    lr: float = 6e-3,
    seed: int = 0,
    colour_invariant: bool = True,
    log_every: int = 0,
) -> SmallClassifier:
    """Fit a SmallClassifier on the first `num_images` of `train` (held in memory; no flips: classes need not
    be mirror-symmetric; `colour_invariant` applies ``colour_jitter``) with AdamW and a one-cycle schedule;
    returns it in eval mode."""
    images, labels = stack_dataset(train, num_images)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallClassifier(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        pick = torch.randint(len(images), (batch_size,), generator=g)
        x = colour_jitter(images[pick], g) if colour_invariant else images[pick]
        loss = F.cross_entropy(model(x), labels[pick], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"[classifier] step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    return model.eval()


@torch.no_grad()
def predict(model: SmallClassifier, images_B3HW: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class per image, (B,) long."""
    model.eval()
    return torch.cat([model(chunk).argmax(1) for chunk in images_B3HW.split(batch_size)])


def accuracy(model: SmallClassifier, images_B3HW: torch.Tensor, labels_B: torch.Tensor) -> float:
    return (predict(model, images_B3HW) == labels_B).float().mean().item()


def per_class_accuracy(pred_B: torch.Tensor, labels_B: torch.Tensor, num_classes: int) -> list[float]:
    """Accuracy for each class among the images of that class (nan where a class has none)."""
    out = []
    for c in range(num_classes):
        mask = labels_B == c
        out.append((pred_B[mask] == c).float().mean().item() if mask.any() else float("nan"))
    return out


def save_classifier(model: SmallClassifier, path: str | os.PathLike, meta: dict) -> None:
    """Weights plus the settings it was trained for (`meta`, e.g. resolution and data options), atomically."""
    payload = {"state_dict": model.state_dict(), "num_classes": model.num_classes, "width": model.width}
    atomic_save({**payload, "meta": dict(meta)}, path)


def load_classifier(path: str | os.PathLike, expect_meta: dict | None = None) -> SmallClassifier | None:
    """The classifier saved at `path`, or None if it is absent or was trained for other settings."""
    if not os.path.exists(path):
        return None
    payload = torch_load(path, "class judge file")
    if expect_meta is not None and payload.get("meta") != dict(expect_meta):
        return None
    model = SmallClassifier(payload["num_classes"], payload["width"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def class_names_from_files(names: Sequence[str], class_names: Sequence[str]) -> list[int]:
    """Label of each predicted PNG from its name, as ``predict`` writes them: ``..._class_<name>_<i>.png``
    for class models, ``..._caption<j>_<i>_<caption words>.png`` for text models (the one class name among
    the caption's words)."""
    labels = []
    for name in names:
        stem = os.path.basename(name).rsplit(".", 1)[0]
        found = [i for i, c in enumerate(class_names) if f"class_{c}_" in stem + "_"]
        if not found:
            words = set(re.split(r"[^A-Za-z0-9]+", stem))
            found = [i for i, c in enumerate(class_names) if c in words]
        if len(found) != 1:
            raise ValueError(
                f"{name}: cannot tell the class from the file name; expected '..._class_<name>_<i>.png' or "
                f"a caption naming exactly one of {list(class_names)}"
            )
        labels.append(found[0])
    return labels
