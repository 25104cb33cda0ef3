"""Score a folder (or list) of generated images against reference images, or compare results across runs.

    python tools/evaluate.py GENERATED REFERENCE [--inception-weights FILE] [--judge-weights FILE]
                             [--reference-stats FILE] [--paired] [--out DIR]
    python tools/evaluate.py --table runs/

GENERATED and REFERENCE are folders of images (read recursively: .png .jpg .jpeg .webp .bmp) or text files
with one image path per line (relative to the list's folder). REFERENCE may be omitted when
``--reference-stats`` names an existing cache. Images are read as RGB and resized (bicubic, antialiased)
to ``--resolution`` (default: the first generated image's size) when their size differs.

- Generation quality (``varctl.metrics.generation``): FID, KID, IS, precision and recall with the FID
  Inception (``--inception-weights``: the local ``pt_inception-2015-12-05-6726825d.pth`` or torch-fidelity's
  ``weights-inception-2015-12-05-6726825d.pth``), and the same statistics in the demo judge's features with
  ``--judge-weights`` (a file from tools/score_samples.py, runs/classifiers/). A network without weights
  is skipped with a message; nothing is downloaded.
- ``--reference-stats FILE``: the reference features are cached there, one file per network (``{network}``
  in the name replaced by it, else ``FILE`` = ``ref.safetensors`` gives ``ref.inception.safetensors``), and
  refused when the reference folder, network weights or resolution changed.
- ``--paired``: generated and reference images pair by file name (their stems); PSNR, SSIM, and the edge
  F1 under both protocols (``controlar``: OpenCV Canny 100/200; ``controlnetpp``: kornia Canny 0.1/0.2; F1
  per image, averaged) of each generated image against its reference.

Writes ``<OUT>/evaluate.json`` (default OUT: ``eval/`` beside GENERATED, i.e. in its run directory;
never overwritten: ``evaluate_1.json`` ...) with every score and what produced it, and the scores as
TensorBoard scalars in ``<OUT>/tensorboard``. ``--table ROOT`` prints the scores of every results file
under ROOT (``varctl test`` writes ``<run>/eval/test.json``), one row per file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from varctl.metrics.generation import (  # noqa: E402
    GenerationMetrics,
    ReferenceStats,
    StaleReference,
    build_networks,
    cached_reference,
    file_sha256,
    fingerprint_files,
    reference_file,
    reference_meta,
)
from varctl.metrics.results import load_results, table, write_results  # noqa: E402

EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def image_files(source: Path) -> list[Path]:
    """The images of a folder (recursively, sorted) or of a list file (one path per line)."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    elif source.is_file():
        lines = [
            ln.strip() for ln in source.read_text().splitlines() if ln.strip() and not ln.startswith("#")
        ]
        files = [(source.parent / ln) if not Path(ln).is_absolute() else Path(ln) for ln in lines]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise SystemExit(f"{source}: {len(missing)} listed images do not exist, e.g. {missing[:3]}")
    else:
        raise SystemExit(f"{source}: no such folder or list file")
    if not files:
        raise SystemExit(f"{source}: no images ({', '.join(sorted(EXTENSIONS))})")
    return files


def load_image(path: Path, size: tuple[int, int] | None) -> torch.Tensor:
    """(3, H, W) in [0, 1], resized to ``size`` (W, H) when it differs."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != size:
                im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
            return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
    except OSError as e:
        raise SystemExit(f"{path}: not a readable image ({e})") from None


def batches(files: list[Path], size: tuple[int, int], batch_size: int):
    for i in range(0, len(files), batch_size):
        yield torch.stack([load_image(f, size) for f in files[i : i + batch_size]])


def paired_scores(generated: list[Path], reference: list[Path], size, batch_size: int) -> dict[str, float]:
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    from varctl.metrics.control import EdgeF1

    by_stem = {f.stem: f for f in reference}
    pairs = [(g, by_stem[g.stem]) for g in generated if g.stem in by_stem]
    if not pairs:
        raise SystemExit("--paired: no generated image has a reference image of the same name")
    psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
    edges = {p: EdgeF1(protocol=p) for p in ("controlar", "controlnetpp")}
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        gen = torch.stack([load_image(g, size) for g, _ in chunk])
        ref = torch.stack([load_image(r, size) for _, r in chunk])
        psnr.update(gen, ref)
        ssim.update(gen, ref)
        for m in edges.values():
            m.update(gen, ref)
    return {
        "paired/num_pairs": len(pairs),
        "paired/psnr": float(psnr.compute()),
        "paired/ssim": float(ssim.compute()),
        "paired/edges_f1": float(edges["controlar"].compute()),
        "paired/edges_f1_controlnetpp": float(edges["controlnetpp"].compute()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("generated", type=Path, nargs="?")
    parser.add_argument("reference", type=Path, nargs="?")
    parser.add_argument("--table", type=Path, default=None, help="print the results files under this folder")
    parser.add_argument("--networks", nargs="+", default=["inception", "judge"])
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--judge-weights", default=None)
    parser.add_argument("--reference-stats", default=None)
    parser.add_argument("--refresh-reference", action="store_true")
    parser.add_argument("--paired", action="store_true")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-tensorboard", action="store_true")
    args = parser.parse_args(argv)

    if args.table is not None:
        print(table(load_results(args.table), root=args.table))
        return {}
    if args.generated is None:
        parser.error("GENERATED is required (or --table ROOT)")
    if args.reference is None and args.reference_stats is None:
        parser.error("REFERENCE is required unless --reference-stats names a cache")
    if args.paired and args.reference is None:
        parser.error("--paired needs REFERENCE images")

    generated = image_files(args.generated)
    reference = image_files(args.reference) if args.reference is not None else None
    with Image.open(generated[0]) as im:
        first = im.size
    size = (args.resolution, args.resolution) if args.resolution else first
    settings = {"inception": "--inception-weights", "judge": "--judge-weights"}
    try:  # a weights file that is not there, or not the network's: named, before any image is read
        nets, skipped = build_networks(
            args.networks, {"inception": args.inception_weights, "judge": args.judge_weights}, settings
        )
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"[evaluate] {e}") from None
    for message in skipped:
        print(f"[evaluate] {message}", flush=True)
    metrics: dict[str, float] = {}
    refs, described = {}, []
    start = time.perf_counter()
    for net in nets:
        judged = getattr(net, "meta", {}).get("resolution")
        if judged is not None and (int(judged), int(judged)) != size:
            raise SystemExit(
                f"{net.weights}: the judge was trained at {judged} px, images are {size[0]}x{size[1]}"
            )
        m = GenerationMetrics(net, args.kid_subsets, args.kid_subset_size, seed=args.seed)
        if reference is not None:
            root = args.reference if args.reference.is_dir() else None  # a list file: the files' own names
            source, fingerprint = str(args.reference.resolve()), fingerprint_files(reference, root)
        else:
            source = fingerprint = None
        path = reference_file(args.reference_stats, net.name) if args.reference_stats else None
        meta = reference_meta(net, size[0], source, fingerprint, len(reference or []))
        try:
            if reference is None:  # the cache alone: check the network, weights and resolution
                expect = {k: v for k, v in meta.items() if k in ("network", "weights_sha256", "resolution")}
                stats, how = ReferenceStats.load(path, expect), "cached"
            else:
                ref_batches = batches(reference, size, args.batch_size)
                stats, how = cached_reference(path, net, meta, ref_batches, args.refresh_reference)
        except StaleReference as e:
            raise SystemExit(f"[evaluate] {e}") from None
        m.set_reference(stats.features)
        for b in batches(generated, size, args.batch_size):
            m.update(b, real=False)
        metrics.update(m.compute())
        refs[net.name] = {"path": path, "how": how, **stats.meta}
        if path is not None:
            refs[net.name]["sha256"] = file_sha256(path)
        described.append(m.settings())
        print(f"[evaluate] {net.name}: {len(generated)} generated, {len(stats.features)} reference ({how})")
    if args.paired:
        metrics.update(paired_scores(generated, reference, size, args.batch_size))
    if not metrics:
        raise SystemExit("[evaluate] nothing to compute: " + "; ".join(skipped) + " (and no --paired)")

    out = args.out if args.out is not None else args.generated.resolve().parent / "eval"
    provenance = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tool": "tools/evaluate.py",
        "generated": {
            "source": str(args.generated.resolve()),
            "num_images": len(generated),
            "fingerprint": fingerprint_files(generated, args.generated if args.generated.is_dir() else None),
        },  # fmt: skip
        "reference": {
            "source": str(args.reference.resolve()) if args.reference else None,
            "num_images": len(reference) if reference else None,
        },  # fmt: skip
        "resolution": list(size),
        "metric_settings": described,
        "skipped": skipped,
        "reference_stats": refs,
        "protocols": {"paired/edges_f1": "controlar", "paired/edges_f1_controlnetpp": "controlnetpp"}
        if args.paired
        else {},
        "seconds": round(time.perf_counter() - start, 1),
    }
    path = write_results(out, "evaluate", metrics, provenance)
    if not args.no_tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(out / "tensorboard")) as tb:
            for k, v in metrics.items():
                tb.add_scalar(f"evaluate/{k}", v, 0)
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        print(f"{k.ljust(width)}  {v:.5g}")
    print(f"[evaluate] results written to {path}")
    return metrics


if __name__ == "__main__":
    main()
