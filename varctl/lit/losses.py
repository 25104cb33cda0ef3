"""Losses of the tokenizer stage: reconstruction, LPIPS, hinge GAN loss and VQGAN's adaptive weight.

The generator objective follows VQGAN (Esser et al., 2021, eq. 4-7):
    L = w_rec |x - x'| + w_p LPIPS(x, x') + w_vq L_vq + w_d lambda L_G,  lambda = |grad L_nll| / |grad L_G|
where both gradients are taken at the decoder's last layer. LPIPS is Zhang et al., 2018, through the
``lpips`` package; its backbone weights come from torchvision's cache and are never downloaded here.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from varctl.files import torch_load

PERCEPTUAL_NETS = ("vgg", "alex")


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: Literal["l1", "l2"]) -> torch.Tensor:
    """Mean absolute (``l1``) or squared (``l2``) error, in float32."""
    if kind == "l1":
        return F.l1_loss(recon.float(), target.float())
    if kind == "l2":
        return F.mse_loss(recon.float(), target.float())
    raise ValueError(f"model.recon_loss must be 'l1' or 'l2', got {kind!r}")


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x'))])."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -E[D(x')]."""
    return -logits_fake.float().mean()


def adaptive_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """VQGAN's lambda = |d nll / d w| / (|d g / d w| + 1e-4), clamped to [0, max_weight], detached.

    ``w`` is the decoder's last weight; both graphs are kept so the caller can still backpropagate.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def adopt_weight(weight: float, step: int, start: int) -> float:
    """``weight`` from step ``start`` on, 0 before (VQGAN's disc_start)."""
    return weight if step >= start else 0.0


# ---------------------------------------------------------------------------------------------- LPIPS
def backbone_weights_file(net: str) -> tuple[Path, str]:
    """Where torchvision caches the ImageNet weights of the LPIPS backbone ``net``, and their URL."""
    import torchvision

    weights = {"vgg": torchvision.models.VGG16_Weights, "alex": torchvision.models.AlexNet_Weights}[net]
    url = weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url), url


def _missing_weights_message(net: str, path: Path, url: str) -> str:
    builder = {"vgg": "vgg16", "alex": "alexnet"}[net]
    return (
        f"model.perceptual.pretrained=true needs the ImageNet weights of LPIPS's '{net}' backbone, but "
        f"{path} does not exist (varctl never downloads weights). Provide the file: on a machine with "
        f"internet run\n"
        f"  python -c \"import torchvision; torchvision.models.{builder}(weights='IMAGENET1K_V1')\"\n"
        f"and copy the file it caches ({url}) to {path}; or point TORCH_HOME at a folder holding "
        f"hub/checkpoints/{path.name} (now TORCH_HOME={os.environ.get('TORCH_HOME', '<unset>')}). "
        f"Otherwise set model.perceptual.weight=0 (no perceptual loss), or model.perceptual.pretrained=false "
        f"(random backbone: a feature loss that is NOT the real LPIPS)."
    )


class PerceptualLoss(nn.Module):
    """LPIPS distance per image, (B,) for inputs in [-1, 1]; frozen and always in eval mode.

    ``pretrained=True`` loads torchvision's ImageNet backbone from the local cache (error naming
    ``model.perceptual.pretrained`` if absent) and the calibrated linear heads shipped with ``lpips``.
    ``pretrained=False`` keeps a random backbone with uniform 1/C heads: a feature distance >= 0 that is not
    LPIPS (its values are not comparable with published LPIPS numbers).
    """

    def __init__(self, net: Literal["vgg", "alex"] = "vgg", pretrained: bool = True):
        super().__init__()
        if net not in PERCEPTUAL_NETS:
            raise ValueError(f"model.perceptual.net must be one of {PERCEPTUAL_NETS}, got {net!r}")
        self.pretrained = bool(pretrained)
        if self.pretrained:
            path, url = backbone_weights_file(net)
            if not path.is_file():  # checked first: fail at once, before any network access
                raise FileNotFoundError(_missing_weights_message(net, path, url))
        import lpips

        # everything random here (no file or network access); the real weights are loaded below, strictly
        # a fixed seed, without touching the caller's RNG: the random variant is the same network on every
        # rank and after a resume (the LPIPS weights are not stored in checkpoints)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(0)
            # silence torchvision's notice about lpips's legacy `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            self.lpips = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
        if self.pretrained:
            self._load_backbone(path)
            self._load_heads(Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth")
        else:
            # random heads can be negative, and a loss unbounded below would push the features apart:
            # weigh every channel by 1/C instead (a plain mean of squared normalised feature differences)
            for head in self.lpips.lins:
                conv = head.model[-1]
                nn.init.constant_(conv.weight, 1.0 / conv.weight.shape[1])
        self.requires_grad_(False)
        self.eval()

    def _load_backbone(self, path: Path) -> None:
        # lpips splits torchvision's `features` into slices that keep the original indices
        state = torch_load(path, f"torchvision {self.lpips.pnet_type} weights file")
        mapped = {}
        for name in self.lpips.net.state_dict():
            key = "features." + name.split(".", 1)[1]  # slice3.10.weight -> features.10.weight
            if key not in state:
                raise ValueError(f"{path}: not a torchvision {self.lpips.pnet_type} file (no '{key}')")
            mapped[name] = state[key]
        self.lpips.net.load_state_dict(mapped, strict=True)

    def _load_heads(self, path: Path) -> None:
        state = torch_load(path, "LPIPS heads file")
        # `lins.k` is an alias list of the `link` heads; the file stores the `link` names
        heads = {k for k in self.lpips.state_dict() if re.match(r"lin\d+\.", k)}
        if set(state) != heads:
            raise ValueError(
                f"{path}: LPIPS head keys {sorted(state)} do not match the model's {sorted(heads)}"
            )
        self.lpips.load_state_dict(state, strict=False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        # the heads carry dropout layers; a training parent module must not switch them on
        return super().train(False)

    def forward(self, x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> torch.Tensor:
        return self.lpips(x_BCHW, y_BCHW).flatten()  # (B,)
