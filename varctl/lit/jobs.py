"""The predict step of generation jobs (``datamodules.jobs``), shared by the VAR and the control stage:
control-to-image on the user's maps, in-painting, out-painting and editing (``Known``), one seed per image.

``Known`` keeps the input's latent outside the mask, but the tokenizer's decoder sees the whole latent (its
convolutions and mid-block attention reach across the mask), so in pixels the kept region is the input's
reconstruction changed by what was drawn beside it: tens of grey levels on the demo's tokenizer. With the
jobs' ``keep_input`` (the default) the output takes the input's own pixels outside the mask (``paste_input``).
"""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn.functional as F

from varctl.callbacks.images import control_pictures
from varctl.models.var_generate import Known


def job_step(module, batch: dict, control: bool) -> dict:
    """Images for the jobs of ``batch``; rows with the same overrides, modalities and kind are drawn
    together, each with its own generator, so a job's image does not depend on its batch. A row that fails
    (unreadable input, a setting this model cannot use) is returned in ``failed`` and the others go on."""
    failed = [(n, e) for n, e in zip(batch["name"], batch["error"]) if e]
    groups: dict[tuple, list[int]] = {}
    for i, error in enumerate(batch["error"]):
        if not error:
            key = (json.dumps(batch["overrides"][i], sort_keys=True), batch["present"][i], batch["edit"][i])
            groups.setdefault(key, []).append(i)
    drawn: dict[int, torch.Tensor] = {}
    for (overrides, present, edit), rows in groups.items():
        try:
            images = _draw(module, batch, rows, json.loads(overrides), present, edit, control)
        except ValueError as err:
            failed += [(batch["name"][i], str(err)) for i in rows]
            continue
        images = images.float().clamp(0, 1)
        if edit and getattr(module.trainer.datamodule, "keep_input", True):
            idx = torch.tensor(rows, device=batch["image"].device)
            images = paste_input(images, batch["image"][idx], batch["mask"][idx])
        drawn.update(zip(rows, images))
    order = sorted(drawn)
    res = module.vae.config.resolution
    images = torch.stack([drawn[i] for i in order]) if order else torch.zeros(0, 3, res, res)
    out = {
        "exact_names": True,
        "images": images,
        "names": [batch["name"][i] for i in order],
        "failed": failed,
    }
    if getattr(module.trainer.datamodule, "sheets", False):
        out["sheets"] = [_sheet(batch, i, drawn[i]) for i in order]
    return out


def paste_input(drawn: torch.Tensor, image: torch.Tensor, redraw: torch.Tensor) -> torch.Tensor:
    """``drawn`` (B, 3, H, W) in [0, 1] with the input ``image`` (B, 3, H, W) in [-1, 1] wherever ``redraw``
    (B, 1, H, W) is 0: exactly the input's pixels there. Inside the mask, within ``H // 64`` pixels (at least
    1) of its edge, the two are blended by the share of kept pixels around each, so the seam is soft and the
    kept region untouched."""
    inside = (redraw > 0).to(drawn.dtype)
    r = max(1, drawn.shape[-2] // 64)
    kept_near = F.avg_pool2d(1 - inside, 2 * r + 1, stride=1, padding=r, count_include_pad=False)
    alpha = inside * (1 - kept_near)
    return alpha * drawn + (1 - alpha) * image.to(drawn.dtype).add(1).mul(0.5)


def _draw(module, batch, rows, overrides, present, edit, control: bool) -> torch.Tensor:
    try:
        sampling = dataclasses.replace(module.predictions, **overrides)
    except ValueError as e:  # a value of the job's own columns, not of the config's predict section
        raise ValueError(f"the job's {str(e).removeprefix(f'{module.predictions.section}.')}") from None
    kwargs = module.sampling_kwargs(sampling, control=control)
    kwargs["seed"] = [int(batch["seed"][i]) for i in rows]
    idx = torch.tensor(rows, device=batch["image"].device)
    if edit:
        patch_nums = module.var.config.patch_nums
        kwargs["known"] = Known.from_image(module.vae, batch["image"][idx], batch["mask"][idx], patch_nums)
    if control:
        kwargs["control_maps"] = {m: batch["control"][m][idx] for m in present}
    if module.text_encoder is not None:
        cond = module.text_encoder([batch["caption"][i] for i in rows])
    else:  # label -1: unconditional (the null class); check_data refuses a list with others, unless unused
        labels, n = batch["label"][idx], module.var.config.num_classes
        if int(labels.max()) >= n or int(labels.min()) < -1:
            raise ValueError(f"labels {labels.tolist()}: the model has {n} classes, expected [0, {n}) or -1")
        cond = torch.where(labels < 0, torch.full_like(labels, n), labels)
    return module.eval_model.generate(cond, vae=module.vae, **kwargs)


def _sheet(batch: dict, i: int, sample: torch.Tensor) -> torch.Tensor:
    """controls | sample | input image (with the redrawn region darkened) side by side, (3, H, W')."""
    tiles = [
        p[0]
        for p in control_pictures({m: batch["control"][m][i : i + 1] for m in batch["present"][i]}).values()
    ]
    tiles.append(sample)
    if batch["has_image"][i]:
        image = batch["image"][i].float().add(1).mul(0.5)
        if batch["edit"][i]:
            image = image * (1 - 0.6 * batch["mask"][i])
        tiles.append(image)
    return torch.cat([t.float().cpu() for t in tiles], dim=-1)
