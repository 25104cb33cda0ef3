"""Do class-conditional samples of the built-in shapes show their class? Score a predictions folder.

    python tools/score_samples.py runs/var/<version>/predictions [--tokenizer PATH] [--steps 1500]

A small CNN (varctl.metrics.classifier) is trained on real synthetic images with the data options of the
run (read from the run directory's config_predict.yaml / config_fit.yaml, or given as flags) and cached under
runs/classifiers/. It reports its accuracy on real validation images (the ceiling), on the tokenizer's
reconstructions of them with --tokenizer (what the tokenizer keeps of the shapes), and on the samples, each
judged against the class it was generated for (chance: 10 %).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from datamodules.scenes import BACKGROUNDS
from datamodules.synthetic import CLASS_NAMES, VAL_OFFSET, SyntheticShapes, check_palette
from varctl.metrics.classifier import (
    accuracy,
    class_names_from_files,
    load_classifier,
    per_class_accuracy,
    predict,
    save_classifier,
    stack_dataset,
    train_classifier,
)
from varctl.models import VQVAE


def run_config(pred_dir: Path) -> dict:
    """The data section of the run that wrote `pred_dir` (empty if there is no saved config)."""
    for name in ("config_predict.yaml", "config_fit.yaml"):
        path = pred_dir.parent / name
        if path.exists():
            return yaml.safe_load(path.read_text()) or {}
    return {}


def load_pngs(pred_dir: Path) -> tuple[torch.Tensor, list[str]]:
    files = sorted(pred_dir.glob("*.png"))
    if not files:
        raise SystemExit(f"{pred_dir}: no PNG files (expected the output folder of `varctl predict`)")
    arrays = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for f in files]
    sizes = {a.shape for a in arrays}
    if len(sizes) != 1:
        raise SystemExit(f"{pred_dir}: images of different sizes {sorted(sizes)}; expected one size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), [f.name for f in files]


def get_classifier(
    resolution: int,
    scenes: dict,
    seed: int,
    steps: int,
    num_train: int,
    cache: Path,
    colour_invariant: bool = True,
):
    """The judge for scenes drawn with `scenes` (SyntheticShapes options), trained once and cached."""
    meta = {
        "resolution": resolution,
        **scenes,
        "seed": seed,
        "steps": steps,
        "num_train": num_train,
        "classifier": "SmallClassifier/v2",  # bump when the classifier or its recipe changes
        "colour_invariant": colour_invariant,
    }
    data = f"{resolution}px_{'-'.join(scenes['backgrounds'])}_d{scenes['max_distractors']}"
    shapes, grounds = scenes["shape_colours"], scenes["background_colours"]
    if shapes or grounds:
        data += f"_{'-'.join(shapes or ['all'])}_on_{'-'.join(grounds or ['all'])}"
    judge = "" if colour_invariant else "_colour"
    tag = f"shapes_{data}_s{seed}_{steps}x{num_train}{judge}.pt"
    path = cache / tag
    model = load_classifier(path, meta)
    if model is not None:
        print(f"[score] classifier {path} (cached)", flush=True)
        return model
    start = time.perf_counter()
    train = SyntheticShapes(
        num_train, resolution, seed=seed + 1, keys=("image", "label"), **scenes
    )  # seed + 1: other scenes than the generator was trained on
    model = train_classifier(
        train,
        len(CLASS_NAMES),
        steps=steps,
        num_images=num_train,
        seed=seed,
        colour_invariant=colour_invariant,
        log_every=max(steps // 5, 1),
    )
    save_classifier(model, path, meta)
    print(f"[score] trained classifier in {time.perf_counter() - start:.0f} s -> {path}", flush=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("predictions", type=Path, help="folder of PNGs named ..._class_<name>_<i>.png")
    parser.add_argument("--backgrounds", nargs="+", default=None, help=f"subset of {list(BACKGROUNDS)}")
    parser.add_argument("--max-distractors", type=int, default=None)
    parser.add_argument("--shape-colours", nargs="+", default=None, help="default: the run's data config")
    parser.add_argument("--background-colours", nargs="+", default=None, help="default: the run's config")
    parser.add_argument(
        "--tokenizer", default=None, help="also score tokenizer reconstructions of val images"
    )
    parser.add_argument("--steps", type=int, default=1500, help="classifier training steps (batch 64)")
    parser.add_argument("--num-train", type=int, default=4000, help="real images the classifier sees")
    parser.add_argument("--num-val", type=int, default=512, help="real validation images to score")
    parser.add_argument(
        "--colour-sensitive",
        action="store_true",
        help="train the judge without colour jitter (learns faster, but then a sample's colours count too)",
    )
    parser.add_argument("--cache", type=Path, default=Path("runs/classifiers"))
    args = parser.parse_args()

    images, names = load_pngs(args.predictions)
    labels = torch.tensor(class_names_from_files(names, CLASS_NAMES))
    cfg = run_config(args.predictions)
    data = cfg.get("data", {}) or {}
    backgrounds = args.backgrounds or data.get("backgrounds") or list(BACKGROUNDS)
    max_distractors = (
        args.max_distractors if args.max_distractors is not None else data.get("max_distractors", 2)
    )
    shape_colours, background_colours = check_palette(
        args.shape_colours or data.get("shape_colours"),
        args.background_colours or data.get("background_colours"),
        backgrounds,
    )
    scenes = {
        "backgrounds": list(backgrounds),
        "max_distractors": int(max_distractors),
        "shape_colours": list(shape_colours) if shape_colours else None,
        "background_colours": list(background_colours) if background_colours else None,
    }
    tokenizer = args.tokenizer or (cfg.get("model", {}) or {}).get("tokenizer")
    resolution = images.shape[-1]
    print(f"[score] {len(images)} samples at {resolution} px; data {scenes}", flush=True)

    clf = get_classifier(
        resolution,
        scenes,
        0,
        args.steps,
        args.num_train,
        args.cache,
        colour_invariant=not args.colour_sensitive,
    )
    val = SyntheticShapes(args.num_val, resolution, offset=VAL_OFFSET, keys=("image", "label"), **scenes)
    real, real_labels = stack_dataset(val, len(val))
    print(f"[score] real val images:        {accuracy(clf, real, real_labels):6.1%}", flush=True)
    if tokenizer:
        vae = VQVAE.load(tokenizer).eval()
        with torch.no_grad():
            recon = torch.cat([vae(x).recon.clamp(-1, 1) for x in real.split(64)])
        print(f"[score] tokenizer reconstructions: {accuracy(clf, recon, real_labels):6.1%}", flush=True)
    pred = predict(clf, images)
    print(f"[score] samples (target = the generated class): {(pred == labels).float().mean():6.1%} "
          f"(chance {1 / len(CLASS_NAMES):.0%})", flush=True)  # fmt: skip
    for name, acc in zip(CLASS_NAMES, per_class_accuracy(pred, labels, len(CLASS_NAMES))):
        if acc == acc:  # skip classes without samples (nan)
            print(f"[score]   {name:<8} {acc:6.1%}", flush=True)


if __name__ == "__main__":
    main()
