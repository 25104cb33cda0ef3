"""The fast samplers of ``VAR.generate`` against exact sampling, side by side in one run: speed, and what each
costs in quality.

    python tools/bench_fast_sampling.py speed [--batch-sizes 1 4] [--device cpu]
    python tools/bench_fast_sampling.py quality --var VAR_CKPT --refiner SMALL_VAR_CKPT --judge JUDGE.pt
                                                [--control CONTROL_CKPT] [--per-class 20]
    python tools/bench_fast_sampling.py control --control CONTROL_CKPT [--control-refiner SMALL_CONTROL_CKPT]
                                                [--control-strength 1,1,1,1,1.5,2]

Variants (each one switch of ``generate``, then all three): ``prune`` (FastVAR token pruning, half the
tokens of the last scales), ``skip`` (guidance skipped at the last two scales), ``refine`` (a smaller VAR
draws the last scales, CoDe), ``all``. Their settings follow the number of scales K: the refiner from
round(0.6 K) (CoDe's 6 of 10), pruning at the last two scales or fewer (the refiner must run the pruning's
reference scale: the last one at K = 6), guidance skipped from K - 2.

``speed``: VAR-d16 with random weights (a d8 refiner), cfg 1.5, top-k 900, top-p 0.96, VQVAE decode
included; times are medians over ``--repeats`` interleaved runs and each is printed as a speed-up over exact.

``quality``: the demo's models on the built-in scenes (the data settings come from the VAR run's config):
``--per-class`` samples of every class at the run's predict settings, each variant with the same seeds. The
class judge (tools/score_samples.py) gives the share of samples judged as their class and ``fd_judge``, the
Frechet distance in its features to real validation images; the mean absolute pixel difference from the
exact samples says how far a variant moves them. With ``--control`` the control model's samples of
validation edge maps (at its scoring settings; ``--control-strength`` sets the strength) are also drawn
exactly and with each fast sampler (the refiner: ``--control-refiner``, a control checkpoint on a smaller
VAR, its own branch; without it ``all`` is pruning and skipping) and scored by edge F1 against their real
images (the ``controlar`` protocol).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch
import yaml
from benchlib import interleaved, machine, steady_allocator, timed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.synthetic import VAL_OFFSET, SyntheticShapes  # noqa: E402
from varctl.metrics.generation import GenerationMetrics, JudgeFeatures  # noqa: E402
from varctl.models.var import VAR  # noqa: E402
from varctl.models.vqvae import VQVAE  # noqa: E402


def variants(K: int, refiner) -> dict[str, dict]:
    draft = round(0.6 * K)  # CoDe's split: the drafter draws 6 of VAR's 10 scales
    # pruning stops short of the drafter's scales: the refiner must run the pruning's reference scale
    prune = {"token_pruning": {"ratio": 0.5, "scales": min(2, K - 1 - draft)}}
    skip = {"skip_guidance_from": K - 2}
    refine = {"refiner": refiner, "draft_scales": draft}
    return {"exact": {}, "prune": prune, "skip": skip, "refine": refine, "all": {**prune, **skip, **refine}}


def scene_settings(config: dict) -> dict:
    """The built-in scenes' settings of a run (its config_fit.yaml)."""
    data = config["data"]
    return {k: data[k] for k in ("backgrounds", "max_distractors", "shape_colours", "background_colours")}


def speed(args) -> None:
    torch.manual_seed(0)
    dev = args.device
    vae = VQVAE.build("vae_ch160v4096z32").eval().to(dev)
    var = VAR.build("d16").attach_vae(vae).eval().to(dev)
    small = VAR.build("d8").attach_vae(vae).eval().to(dev)
    runs = variants(var.config.num_scales, small)
    sample = dict(cfg=1.5, top_k=900, top_p=0.96)
    print(f"{machine(dev)}, torch {torch.__version__}, VAR-d16 (refiner d8), {sample}", flush=True)

    def draw(name: str, B: int, seed: int):
        images = var.generate(torch.arange(B) * 7, seed=seed, **sample, **runs[name])
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return images

    steady_allocator()
    for name in runs:
        draw(name, 1, 0)  # warm-up
    for B in args.batch_sizes:
        times = {name: [] for name in runs}
        for r, order in enumerate(interleaved(list(runs), args.repeats)):
            for name in order:
                times[name].append(timed(lambda n=name, r=r, B=B: draw(n, B, 100 + r), dev)[0])
        exact = statistics.median(times["exact"])
        row = ", ".join(f"{n} {exact / statistics.median(t):.2f}x" for n, t in times.items() if n != "exact")
        print(f"B={B}: exact {exact:.2f}s; speed-up: {row}", flush=True)


def quality(args) -> None:
    torch.manual_seed(0)
    run_dir = Path(args.var).resolve().parents[1]
    config = yaml.safe_load((run_dir / "config_fit.yaml").read_text())
    scenes = scene_settings(config)
    vae = VQVAE.load(config["model"]["tokenizer"]).eval()
    var = VAR.load(args.var, vae=vae).eval()
    refiner = VAR.load(args.refiner, vae=vae).eval()
    predict = config["model"].get("predict") or {}
    sample = {k: predict[k] for k in ("cfg", "top_k", "top_p") if k in predict}
    res = vae.config.resolution
    val = SyntheticShapes(args.num_real, res, offset=VAL_OFFSET, keys=("image", "label"), **scenes)
    real = torch.stack([val[i]["image"] for i in range(len(val))]).add(1).div(2)
    judge = JudgeFeatures(args.judge)
    n = var.config.num_classes
    labels = torch.arange(n).repeat_interleave(args.per_class)
    runs = variants(var.config.num_scales, refiner)
    print(f"{machine('cpu')}; {len(labels)} samples per variant at {sample}, {len(real)} real images")

    exact = None
    for name, fast in runs.items():
        with torch.no_grad():
            t, images = timed(lambda fast=fast: torch.cat([
                var.generate(lab, seed=args.seed + i, **sample, **fast)
                for i, lab in enumerate(labels.split(args.batch_size))
            ]))  # fmt: skip
        exact = images if exact is None else exact
        metrics = GenerationMetrics(judge, kid_subsets=10, kid_subset_size=min(len(labels), len(real)) // 2)
        metrics.update(real, real=True)
        metrics.update(images, real=False)
        scores = metrics.compute()
        judged = judge(images)[1].argmax(-1)
        print(
            f"{name:<7} judged as their class {(judged == labels).float().mean():6.1%}, "
            f"fd_judge {scores['fd_judge']:.3f}, |img - exact| {(images - exact).abs().mean():.4f}, "
            f"{t:.1f} s",
            flush=True,
        )
    if args.control:
        control_quality(args, scenes)


def control_only(args) -> None:
    """``control``: the control checkpoint's VAR run gives the data settings."""
    from varctl.lit.control import ControlModule

    module = ControlModule.load_from_checkpoint(args.control, map_location="cpu")
    config = yaml.safe_load((Path(args.control).resolve().parents[1] / "config_fit.yaml").read_text())
    scenes = scene_settings(config)
    print(machine("cpu"))
    control_quality(args, scenes, module)


def control_quality(args, scenes: dict, module=None) -> None:
    """Edge F1 of the control model's samples of validation edge maps, exact and with each fast sampler, at
    the model's scoring settings (``--control-strength`` overrides its strength). The refiner is a smaller
    control model (``--control-refiner``, a control checkpoint on a smaller VAR); without one, ``all`` is
    pruning and skipping."""
    from varctl.lit.control import ControlModule
    from varctl.metrics.control import EdgeF1

    if module is None:
        module = ControlModule.load_from_checkpoint(args.control, map_location="cpu")
    module.eval()
    refiner = None if args.control_refiner is None else module.load_refiner(args.control_refiner).eval()
    runs = variants(module.var.config.num_scales, refiner)
    if refiner is None:
        del runs["refine"]
        runs["all"] = {k: v for k, v in runs["all"].items() if k not in ("refiner", "draft_scales")}
    res = module.vae.config.resolution
    val = SyntheticShapes(args.num_control, res, offset=VAL_OFFSET, keys=("image", "label", "control"),
                          controls=("edges",), **scenes)  # fmt: skip
    items = [val[i] for i in range(len(val))]
    images = torch.stack([it["image"] for it in items]).add(1).div(2)
    labels = torch.tensor([it["label"] for it in items])
    edges = torch.stack([it["control"]["edges"] for it in items])
    sampling = module.scoring
    if args.control_strength is not None:
        strength = [float(v) for v in args.control_strength.split(",")]
        strength = strength[0] if len(strength) == 1 else strength
        sampling = dataclasses.replace(sampling, control_strength=strength)
    settings = {k: getattr(sampling, k) for k in ("cfg", "control_cfg", "control_strength", "top_k", "top_p")}
    print(f"control: {len(labels)} validation edge maps at {settings}")
    batches = list(zip(labels.split(args.batch_size), edges.split(args.batch_size)))
    exact = exact_s = None
    for name in runs:
        f1 = EdgeF1("controlar")
        with torch.no_grad():
            t, samples = timed(lambda name=name: torch.cat([
                module.eval_model.generate(
                    lab, control_maps={"edges": e}, vae=module.vae,
                    **{**module.sampling_kwargs(sampling, args.seed + i, control=True), **runs[name]},
                )
                for i, (lab, e) in enumerate(batches)
            ]))  # fmt: skip
        if exact is None:
            exact, exact_s = samples, t
        f1.update(samples, images)
        print(
            f"control {name:<6} edge F1 {float(f1.compute()):.3f}, |img - exact| "
            f"{(samples - exact).abs().mean():.4f}, {t:.1f} s ({exact_s / t:.2f}x, one run)",
            flush=True,
        )


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    s.add_argument("--repeats", type=int, default=2)
    s.add_argument("--device", default="cpu")
    q = sub.add_parser("quality")
    q.add_argument("--var", required=True, help="the demo's VAR checkpoint (its run's config names the data)")
    q.add_argument("--refiner", required=True, help="a smaller VAR on the same tokenizer")
    q.add_argument("--judge", required=True, help="the class judge of tools/score_samples.py")
    q.add_argument("--control", default=None, help="a control checkpoint on the same VAR (edge F1)")
    q.add_argument("--per-class", type=int, default=20)
    q.add_argument("--num-real", type=int, default=512)
    c = sub.add_parser("control", help="the control part of quality alone")
    c.add_argument("--control", required=True, help="the demo's control checkpoint")
    for p in (q, c):
        p.add_argument("--num-control", type=int, default=64)
        p.add_argument("--control-strength", help="one strength, or one per scale: 1,1,1,1,1.5,2")
        p.add_argument("--control-refiner", help="a control checkpoint on a smaller VAR (the refiner)")
        p.add_argument("--batch-size", type=int, default=50)
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    {"speed": speed, "quality": quality, "control": control_only}[args.mode](args)


if __name__ == "__main__":
    main()
