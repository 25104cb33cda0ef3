"""Time ``VAR.generate`` at the VAR-d16 shape (random weights, official-shape VQVAE) for batch 1 and 4.

With ``--official PATH_TO_VAR_GIT_DIR`` the official ``autoregressive_infer_cfg`` runs on the same weights in
the same process, interleaved with varctl's runs (so both see the same machine load): the speed-up (the
official time over varctl's), the peak memory of each (one more call each, ``benchlib.PeakMemory``) and the
largest image difference are printed. The official tree is exported with ``git archive`` to a temporary
directory; a missing ``huggingface_hub`` (only imported for a Hub mixin) is stubbed in ``sys.modules`` here.
With ``--bf16`` varctl also runs under ``torch.autocast(dtype=torch.bfloat16)`` on the same device (fast on
CPUs with AVX512-BF16/AMX and on GPUs), interleaved too, with its image difference from float32 (the sampled
tokens may differ). With ``--control`` it also times sampling under an edge control branch (random weights):
the cost of control. With ``--compile MODE`` a copy whose blocks are compiled (``torch.compile``) runs too.
Times are medians over ``--repeats`` runs after a warm-up.

An image difference below 1e-3 means the same tokens were drawn (one other token moves pixels by ~0.1):
what is left is float rounding, mostly the decoder's Winograd convolutions (varctl/models/kernels.py).

    python tools/bench_sample.py [--official PATH_TO_VAR_GIT_DIR] [--bf16] [--control]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile

import torch
from benchlib import PeakMemory, interleaved, load_official, machine, steady_allocator, timed

from varctl.lit.compiling import compile_var
from varctl.models.control import ControlBranch, shape_of
from varctl.models.var import VAR
from varctl.models.vqvae import VQVAE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--official", default=None, help="git dir of FoundationVision/VAR to compare with")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per batch size (after 1 warm-up)")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--top-k", type=int, default=900)
    parser.add_argument("--top-p", type=float, default=0.96)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--bf16", action="store_true", help="also time varctl under bf16 autocast")
    parser.add_argument("--control", action="store_true", help="also time varctl with an edge control branch")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the official code: CPU only)")
    parser.add_argument(
        "--compile", default=None, help="also time a copy with compiled blocks (a torch.compile mode)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.official and args.device != "cpu":
        parser.error("--official compares on the CPU only (use --device cpu)")
    torch.manual_seed(0)
    vae = VQVAE.build("vae_ch160v4096z32").eval().to(args.device)
    var = VAR.build(f"d{args.depth}").attach_vae(vae).eval().to(args.device)
    print(
        f"{machine(args.device)}, torch {torch.__version__}, VAR-d{args.depth} "
        f"({sum(p.numel() for p in var.parameters()) / 1e6:.1f}M), cfg={args.cfg}, top_k={args.top_k}, "
        f"top_p={args.top_p}",
        flush=True,
    )

    with tempfile.TemporaryDirectory() as tmp:
        official = load_official(args.official, tmp, vae, var) if args.official else None
        sample = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
        branch = None
        if args.control:  # a random (non-zero) edge branch: the cost of control, not its quality
            branch = ControlBranch.build({}, **shape_of(var.config, vae.config.resolution)).to(args.device)
            with torch.no_grad():
                for p in branch.parameters():
                    p.normal_(0, 0.02)

        compiled = None
        if args.compile:  # a copy whose blocks are compiled (the sampler's shapes change per scale)
            if args.compile == "reduce-overhead":
                parser.error(
                    "--compile reduce-overhead compiles the teacher-forcing forward, not the sampler"
                )
            compiled = copy.deepcopy(var).attach_vae(vae)
            compile_var(compiled, args.compile)

        def ours(B: int, seed: int, bf16: bool = False, control: bool = False, model=var):
            kwargs = {}
            if control:
                res = vae.config.resolution
                edges = (
                    torch.rand(B, 1, res, res, generator=torch.Generator().manual_seed(seed)) > 0.9
                ).float()
                kwargs["control"] = branch.encode({"edges": edges.to(args.device)})
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=bf16):
                images = model.generate(torch.arange(B) * 7, seed=seed, **sample, **kwargs)
            if args.device == "cuda":
                torch.cuda.synchronize()
            return images.cpu()

        def theirs(B: int, seed: int):
            with torch.no_grad():
                return official.autoregressive_infer_cfg(
                    B=B, label_B=torch.arange(B) * 7, g_seed=seed, **sample
                )

        # name -> (sampler, how its images compare with varctl's float32 ones)
        variants = {"varctl": (ours, None)}
        if official is not None:
            variants["official"] = (theirs, "max")
        if args.bf16:
            variants["varctl bf16"] = (lambda B, seed: ours(B, seed, bf16=True), "mean")
        if branch is not None:
            variants["varctl + control"] = (lambda B, seed: ours(B, seed, control=True), None)
        if compiled is not None:
            variants[f"varctl compiled ({args.compile})"] = (
                lambda B, seed: ours(B, seed, model=compiled),
                "max",
            )
            if args.bf16:
                variants["varctl compiled bf16"] = (
                    lambda B, seed: ours(B, seed, True, model=compiled),
                    "mean",
                )
        steady_allocator()
        for fn, _ in variants.values():
            for B in args.batch_sizes if compiled is not None else [1]:  # compiled: every shape compiles once
                timed(lambda fn=fn, B=B: fn(B, 0))  # warm-up (allocator, oneDNN primitives, compilation)
        for B in args.batch_sizes:
            times = {name: [] for name in variants}
            diffs = dict.fromkeys(variants, 0.0)
            for r, order in enumerate(interleaved(list(variants), args.repeats)):  # the same machine load
                images = {}
                for name in order:
                    t, images[name] = timed(
                        lambda fn=variants[name][0], B=B, r=r: fn(B, 100 + r), args.device
                    )
                    times[name].append(t)
                for name, (_, compare) in variants.items():
                    diff = (images[name] - images["varctl"]).abs()
                    if compare == "max":
                        diffs[name] = max(diffs[name], diff.max().item())
                    elif compare == "mean":
                        diffs[name] = max(diffs[name], diff.mean().item())
            peaks = {}
            for name, (fn, _) in variants.items():
                with PeakMemory(args.device) as mem:
                    fn(B, 100)
                peaks[name] = mem.peak
            base = statistics.median(times["varctl"])
            parts = []
            for name, (_, compare) in variants.items():
                med = statistics.median(times[name])
                part = f"{name} median {med:.2f}s ({B / med:.1f} images/s) min {min(times[name]):.2f}s"
                part += f", peak +{peaks[name] / 2**20:.0f} MiB"
                if name != "varctl":
                    part += f" (time {med / base:.2f}x varctl's)"
                if compare is not None:
                    part += f", {compare} |img diff| {diffs[name]:.2e}"
                parts.append(part)
            print(f"B={B}: " + " | ".join(parts), flush=True)
            if official is not None:
                med = statistics.median(times["official"])
                print(
                    f"B={B}: varctl is {med / base:.2f}x the official speed, with "
                    f"{peaks['varctl'] / max(peaks['official'], 1):.2f}x its peak memory",
                    flush=True,
                )


if __name__ == "__main__":
    main()
