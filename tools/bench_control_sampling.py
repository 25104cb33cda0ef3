"""Controlled sampling time relative to the VAR's own sampling, per injector, side by side in one process.

    python tools/bench_control_sampling.py [--injectors scalar,car,car-own,...] [--batch-size 16]
                                           [--repeats 5] [--processes 1] [--var-depth 4] [--car-blocks 2]
                                           [--off-from 5] [--width 16] [--device cpu]

Each injector takes ``conf/control.yaml``'s settings, as ``tools/compare_injectors.py`` runs it (car: the
demo's layout, one side block without the class feeding every later block). ``car-own`` is car in CAR's own
layout (depth / 2 side blocks conditioned on the class, each into one of the last blocks), ``car-own-none``
the same without the class (one side pass serves a sample and its guidance copy); ``prefill-class`` is prefill
with its prefix conditioned on each sample's class (a prefix pass for a sample and one for its guidance copy;
conf/control.yaml's takes the null condition, one pass for both).

The demo's shapes (``conf/tokenizer.yaml``'s tokenizer at 64 px, a class VAR of ``--var-depth``, the
control branch of ``conf/control.yaml``) with random weights: the time of a call does not depend on the
weights (``top_k`` 0, the decoder included). For each injector the controlled ``generate`` (class guidance 3,
no control guidance, as ``tools/compare_injectors.py`` times it) and the plain ``VAR.generate`` run
alternately; the medians' ratio is printed, and the median of the rounds' ratios (each round times every
call back to back, so a machine whose speed drifts between rounds does not move it), then the same with
the control switched off from scale ``--off-from`` on (``control_strength`` 1 before, 0 after: the
injectors with state across scales stop there, the others skip those scales). The quality side of that
trade-off needs a trained branch: README, "Stages".

One process can favour one code for its whole life (on a 2-core VM the same injector measured 0.97x in one
process and 1.18x in the next), so ``--processes N`` measures in N fresh processes, one after the other,
and prints the median of all their rounds' ratios, its 95 % bootstrap interval (resampling the processes,
then the rounds of each) and the range of the processes' own medians. Each process starts with the next
injector of the list (the same injector ran at 1.08x measured second in a process and 1.13x fifth).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from benchlib import (
    add_pooling,
    in_processes,
    interleaved_times,
    machine,
    paired_speedup,
    ratio_interval,
    round_ratios,
    steady_allocator,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from varctl.cli.config import compose, validate  # noqa: E402
from varctl.models.control import (  # noqa: E402
    CAR_OWN_LAYOUT,
    INJECTORS,
    ControlBranch,
    ControlConfig,
    ControlledVAR,
)
from varctl.models.var import VAR, VARConfig  # noqa: E402
from varctl.models.vqvae import VQVAE  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
VARIANTS = {
    "car-own": ("car", CAR_OWN_LAYOUT),
    "car-own-none": ("car", {**CAR_OWN_LAYOUT, "car_condition": "none"}),
    "prefill-class": ("prefill", {"prefix_condition": "class"}),
}
NAMES = [*INJECTORS, *VARIANTS]


def ratio(times: dict[str, list[float]], name: str) -> str:
    """``name``'s time relative to the plain VAR's: the medians' ratio / the median of the rounds' ratios."""
    medians = statistics.median(times[name]) / statistics.median(times["plain"])
    return f"{medians:.2f}x / {paired_speedup(times['plain'], times[name]):.2f}x"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    layouts = (
        "car-own: car in CAR's own layout; car-own-none: the same without the class; prefill-class: "
        "the prefix conditioned on the class"
    )
    parser.add_argument("--injectors", default=",".join(NAMES), help=layouts)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    add_pooling(parser)
    parser.add_argument("--var-depth", type=int, default=4)
    parser.add_argument("--car-blocks", type=int, default=None,
                        help="car's side blocks (car-own: depth / 2, car: conf/control.yaml's)")  # fmt: skip
    parser.add_argument("--width", type=int, default=None,
                        help="the control encoder's width (default: conf/control.yaml's)")  # fmt: skip
    parser.add_argument("--off-from", type=int, default=None, help="default: the last scale")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    unknown = [n for n in args.injectors.split(",") if n not in NAMES]
    if unknown:
        parser.error(f"--injectors: unknown {unknown}; choose from {','.join(NAMES)}")
    if args.repeats < 1 or args.processes < 1:
        parser.error("--repeats and --processes must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.processes > 1:
        runs = in_processes(__file__, sys.argv[1:] if argv is None else argv, args.processes)
        print(f"{runs[0]['header']}, in each of {args.processes} fresh processes")
        print(f"{'injector':<13} {'control':>30} {'off from scale ' + str(runs[0]['off_from']):>30}")
        for label in runs[0]["rows"]:
            cells = [
                ratio_interval([round_ratios(r["rows"][label]["plain"], r["rows"][label][k]) for r in runs])
                for k in ("control", "early")
            ]
            print(f"{label:<13} {cells[0]:>30} {cells[1]:>30}", flush=True)
        print("(the median of every round's ratio [its 95 % interval, resampling the processes and their "
              "rounds] (the processes' own medians))")  # fmt: skip
        return
    header, off_from, rows = measure(args)
    if args.json:
        print(json.dumps({"header": header, "off_from": off_from, "rows": rows}))


def measure(args: argparse.Namespace) -> tuple[str, int, dict[str, dict[str, list[float]]]]:
    """Time each injector's calls; prints a line per injector unless ``--json``. Returns the header, the
    scale the control is switched off from, and each row's times (plain, control, early: one per round)."""
    names = args.injectors.split(",")
    first = int(os.environ.get("BENCH_PROCESS", "0")) % len(names)  # --processes: each child starts
    names = names[first:] + names[:first]  # with another injector (a process's later models run slower)
    torch.manual_seed(0)
    tok = validate(compose(CONF / "tokenizer.yaml", []), CONF / "tokenizer.yaml")
    control_conf = compose(CONF / "control.yaml", ["model.tokenizer=unused"])["model"]["control"]
    dev = args.device
    vae = VQVAE.build(tok["model"]["vqvae"]).eval().to(dev)
    vc = vae.config
    var = VAR(
        VARConfig(depth=args.var_depth, vocab_size=vc.vocab_size, z_channels=vc.z_channels,
                  patch_nums=vc.patch_nums, num_classes=5)
    ).eval().to(dev)  # fmt: skip
    K = len(vc.patch_nums)
    off_from = K - 1 if args.off_from is None else args.off_from
    if not 0 < off_from < K:
        raise SystemExit(f"--off-from must be a scale index in [1, {K - 1}], found {off_from}")
    strength = [1.0] * off_from + [0.0] * (K - off_from)
    B = args.batch_size
    cond = (torch.arange(B) % 5).to(dev)
    maps = {"edges": (torch.rand(B, 1, vc.resolution, vc.resolution) > 0.9).float().to(dev)}
    kw = dict(cfg=3.0, top_k=0, top_p=0.0, seed=0, vae=vae)
    fields = {k: control_conf[k] for k in ("width", "max_width", "feature_dim")}
    fields["width"] = args.width or fields["width"]
    steady_allocator()
    header = (
        f"{machine(dev)}, torch {torch.__version__}; VAR d{args.var_depth}, {vc.resolution} px, "
        f"batch {B}, guidance 3, decode included; {args.repeats} rounds of alternating calls"
    )
    say = (lambda *a, **k: None) if args.json else print
    say(header)
    say(f"{'injector':<13} {'control':>14} {'off from scale ' + str(off_from):>20}   (medians' ratio / "
        "median of the rounds' ratios)")  # fmt: skip
    rows = {}
    settings = (
        "blocks",
        "car_blocks",
        "car_condition",
        "car_targets",
        "prefix_side",
        "prefix_condition",
        "adapter_dim",
    )
    configured = {k: control_conf[k] for k in settings if control_conf.get(k) is not None}  # the config's
    for name in names:
        injector, layout = VARIANTS.get(name, (name, {}))
        extra = {**configured, **layout}
        if injector == "car" and args.car_blocks:
            extra["car_blocks"] = args.car_blocks
        config = ControlConfig.for_var(var.config, resolution=vc.resolution, injector=injector,
                                       modalities=["edges"], **fields, **extra)  # fmt: skip
        model = ControlledVAR(var, ControlBranch.build(config).init_from_backbone(var)).eval().to(dev)
        t = interleaved_times(
            {
                "plain": lambda: var.generate(cond, **kw),
                "control": lambda m=model: m.generate(cond, control_maps=maps, **kw),
                "early": lambda m=model: m.generate(cond, control_maps=maps, control_strength=strength, **kw),
            },
            args.repeats,
            dev,
        )
        label = name + (f" N={args.car_blocks}" if injector == "car" and args.car_blocks else "")
        label += f" w={args.width}" if args.width else ""
        say(f"{label:<13} {ratio(t, 'control'):>14} {ratio(t, 'early'):>20}", flush=True)
        rows[label] = t
    return header, off_from, rows


if __name__ == "__main__":
    main()
