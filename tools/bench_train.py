"""Time one VAR training step at the VAR-d16 shape (random weights, 256 px, 680 tokens per image).

A step is what the VAR stage does per batch once the tokens are known (from a token cache or the frozen
tokenizer, the same for both codes and left out): teacher-forcing forward, cross-entropy, backward,
gradient clipping at 2.0, AdamW (betas 0.9/0.95, weight decay 0.05 on matrices) as varctl's stage builds it
(``varctl.lit.optim.adamw``). With ``--official PATH_TO_VAR_GIT_DIR`` the official VAR runs the same step on
the same weights and batch with the official optimizer (fused AdamW), interleaved with varctl's steps, and the
speed-up is printed twice: by the two medians, and by the median of each round's ratio (both steps back to
back: robust to a machine whose speed drifts between rounds, ``benchlib.paired_speedup``). On a GPU
(``--device cuda``) the step's model FLOPs utilisation is printed too: the FLOPs of one step counted by
``torch.utils.flop_counter`` (matmuls and attention, forward and backward) over its time, against
``--peak-tflops`` (default: dense bf16 of an H100/H200 SXM). ``--compile MODE`` compiles as
``model.compile_mode`` does (varctl/lit/compiling.py; reduce-overhead: the whole forward, CUDA graphs).
``--processes N`` measures in N fresh processes, one after the other, and pools their rounds
(``benchlib.median_interval``: the median ratio with its 95 % interval, resampling the processes).

    python tools/bench_train.py [--official PATH_TO_VAR_GIT_DIR] [--batch-size 2] [--device cpu|cuda]
                                [--bf16] [--compile MODE] [--peak-tflops 989] [--one-masked-call]
                                [--repeats 3] [--processes 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile

import torch
import torch.nn.functional as F
from benchlib import (
    PeakMemory,
    add_pooling,
    in_processes,
    interleaved,
    load_official,
    machine,
    paired_speedup,
    ratio_interval,
    round_ratios,
    steady_allocator,
    timed,
)
from torch.utils.flop_counter import FlopCounterMode

from varctl.lit.compiling import compile_var
from varctl.lit.optim import adamw, no_weight_decay_names, param_groups
from varctl.models.var import VAR
from varctl.models.vqvae import VQVAE


def make_step(model, optimizer, labels, x_BLCv, target_BL, device: str, bf16: bool):
    def step():
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            logits_BLV = model(labels, x_BLCv)
        loss = F.cross_entropy(logits_BLV.float().flatten(0, 1), target_BL.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--official", default=None, help="git dir of FoundationVision/VAR to compare with")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps each (after 1 warm-up)")
    add_pooling(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (both codes)")
    parser.add_argument(
        "--compile", default=None, help="model.compile_mode: default, max-autotune, reduce-overhead"
    )
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense peak for MFU")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--one-masked-call", action="store_true",
        help="also time varctl with attention as one masked call (not by groups of scales)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.processes < 1:
        parser.error("--repeats and --processes must be at least 1")
    if args.processes > 1:
        pooled(in_processes(__file__, sys.argv[1:] if argv is None else argv, args.processes))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device

    torch.manual_seed(0)
    vae = VQVAE.build("vae_ch160v4096z32").eval()
    var = VAR.build(f"d{args.depth}").attach_vae(vae)
    c = var.config
    B = args.batch_size
    g = torch.Generator().manual_seed(1)
    idx = [torch.randint(0, c.vocab_size, (B, pn * pn), generator=g) for pn in c.patch_nums]
    with torch.no_grad():
        x_BLCv = vae.quantize.idx_to_var_input(idx).to(dev)
    target_BL = torch.cat(idx, dim=1).to(dev)
    labels = torch.randint(0, c.num_classes, (B,), generator=g).to(dev)

    with tempfile.TemporaryDirectory() as tmp:
        official = load_official(args.official, tmp, vae, var) if args.official else None
        var = var.to(dev).train()
        steps = {}
        optimizer = adamw(param_groups(var, 0.05, no_weight_decay_names(var)), lr=1e-4, betas=(0.9, 0.95))
        steps["varctl"] = make_step(var, optimizer, labels, x_BLCv, target_BL, dev, args.bf16)
        if args.one_masked_call:
            masked = copy.deepcopy(var)
            masked.query_groups = lambda: masked.attn_bias_for_masking  # models/transformer.py QueryGroups
            opt = adamw(param_groups(masked, 0.05, no_weight_decay_names(masked)), lr=1e-4, betas=(0.9, 0.95))
            steps["varctl, one masked call"] = make_step(
                masked, opt, labels, x_BLCv, target_BL, dev, args.bf16
            )
        if official is not None:
            official = official.to(dev).train().requires_grad_(True)
            off_opt = torch.optim.AdamW(
                param_groups(official, 0.05, no_weight_decay_names(official)), lr=1e-4, betas=(0.9, 0.95),
                fused=True,
            )  # fmt: skip
            steps["official"] = make_step(official, off_opt, labels, x_BLCv, target_BL, dev, args.bf16)
        with FlopCounterMode(display=False) as counter:  # eager, before any compilation
            steps["varctl"]()
        flops = counter.get_total_flops()
        if args.compile:
            compile_var(var, args.compile)
        header = (
            f"{machine(dev)}, torch {torch.__version__}, VAR-d{args.depth} "
            f"({sum(p.numel() for p in var.parameters()) / 1e6:.1f}M), batch {B}, "
            f"{'bf16 autocast' if args.bf16 else 'float32'}, compiled: {args.compile}"
        )
        say = (lambda *a, **k: None) if args.json else print
        cuda = dev.startswith("cuda")
        say(header, flush=True)
        steady_allocator()
        for step in steps.values():
            for _ in range(2 if args.compile else 1):  # warm-up (compilation, allocator, oneDNN primitives)
                timed(step, dev)
        times = {name: [] for name in steps}
        for order in interleaved(list(steps), args.repeats):  # so both see the same machine load
            for name in order:
                times[name].append(timed(steps[name], dev)[0])
        base = statistics.median(times["varctl"])
        peaks = {}
        for name, step in steps.items():
            with PeakMemory(dev) as mem:
                step()
            peaks[name] = mem.peak
        for name in steps:
            med = statistics.median(times[name])
            line = f"{name}: median {med:.3f}s min {min(times[name]):.3f}s, {B * c.L / med:.0f} tokens/s"
            say(f"{name}: steps of {' '.join(f'{t:.2f}' for t in times[name])} s", flush=True)
            line += f", peak +{peaks[name] / 2**20:.0f} MiB"
            if dev.startswith("cuda"):
                line += (
                    f", MFU {flops / med / (args.peak_tflops * 1e12):.1%} ({flops / med / 1e12:.0f} TFLOP/s)"
                )
            say(line, flush=True)
        for name in steps:
            if name != "varctl":
                ratio = statistics.median(times[name]) / base
                paired = paired_speedup(times["varctl"], times[name])
                say(
                    f"varctl's step is {ratio:.2f}x the speed of {name} by the medians, {paired:.2f}x by "
                    f"the median of the {args.repeats} rounds' ratios (both back to back in each)",
                    flush=True,
                )
        if args.json:
            mfu = {n: flops / statistics.median(t) / (args.peak_tflops * 1e12) for n, t in times.items()}
            print(
                json.dumps({"header": header, "times": times, "peaks": peaks, "mfu": mfu if cuda else None})
            )


def pooled(runs: list[dict]) -> None:
    """Print what ``--processes`` measured: each code's steps, and varctl's speed-up over each other code
    by the median of every round's ratio, its 95 % interval and the processes' own medians."""
    print(f"{runs[0]['header']}, in each of {len(runs)} fresh processes", flush=True)
    for name in runs[0]["times"]:
        steps = [t for r in runs for t in r["times"][name]]
        peak = statistics.median(r["peaks"][name] for r in runs) / 2**20
        mfu = (
            ""
            if runs[0].get("mfu") is None
            else f", MFU {statistics.median(r['mfu'][name] for r in runs):.1%}"
        )
        span = f"{min(steps):.2f}-{max(steps):.2f}s"
        print(f"{name}: {len(steps)} steps, median {statistics.median(steps):.3f}s, {span}, "
              f"peak +{peak:.0f} MiB{mfu} (processes' medians)")  # fmt: skip
    for name in runs[0]["times"]:
        if name != "varctl":
            ratios = [round_ratios(r["times"]["varctl"], r["times"][name]) for r in runs]
            print(f"varctl's step is {ratio_interval(ratios)} the speed of {name} (the median of every "
                  "round's ratio [its 95 % interval] (the processes' own medians))", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
