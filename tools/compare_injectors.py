"""Every control injector on one backbone, data, schedule and evaluation: trains each one with
``conf/control.yaml`` (same steps, seed and settings), scores it, and prints and writes a table.

    python tools/compare_injectors.py --tokenizer runs/tokenizer/<v>/checkpoints/last.ckpt \
        --var runs/var/<v>/checkpoints/last.ckpt [--steps 600] [--injectors scalar car ...] \
        [--control-cfg 1.0] [--root runs/compare] [--val-batches 4] [--tuned prefill] [--judge FILE]
        [--strength 1,1,1,1,1.5,2] [--retime] [--sample-repeats 3]

Each injector runs with ``conf/control.yaml``'s settings (car: the demo's layout, one side block feeding every
later block, without the class). ``car-own`` is car in CAR's own layout: depth / 2 side blocks conditioned on
the class, each into one of the last blocks; ``prefill-class`` is prefill with its prefix conditioned on each
sample's class (conf/control.yaml's prefix takes the null condition). Every row trains with the backbone
frozen; those named by ``--tuned`` (default prefill, whose prefix reaches a frozen backbone only through its
fixed attention) get a second row, "<name> tuned", trained with the backbone fine-tuned as well
(``model.train_backbone=true``).

Columns:
- params: parameters the branch adds;
- step: a training step's forward + backward relative to a stage-2 step of the VAR alone (same batch);
- sample: ``generate`` (guidance, decode included) relative to the VAR's unconditioned-by-control sampling;
- val loss: teacher-forcing cross-entropy on the val split;
- F1 own / other / ceiling: edge F1 (``controlar`` protocol: OpenCV Canny 100/200, per image) of samples
  against their own controls, of samples given other images' controls (what ignoring the control gives),
  and of the tokenizer's reconstructions (the ceiling), without control guidance;
- F1 guided: the F1 own with control guidance ``--control-cfg``; F1++ guided the same under the
  ``controlnetpp`` protocol (kornia Canny 0.1/0.2);
- FD judge guided (with ``--judge``, a class judge from tools/score_samples.py): the Frechet distance of the
  guided samples to the real images in the judge's features (``fd_judge``; lower is better);
- with ``--strength``, a per-scale control strength (the demo's: 1, then 1.5 and 2 at the last two scales):
  F1 own and FD judge of the guided samples drawn with it. Rows kept from an earlier run are scored with it
  from their checkpoints.

The scores come from ``varctl test`` (the evaluation harness, ``varctl.lit.evaluation``) on the first
``--val-batches`` batches of the test split (the built-in data's val scenes): each scoring writes
``<run>/eval/test*.json`` with its provenance, so ``tools/evaluate.py --table <root>`` lists them too.

Times are ratios measured side by side in this process (medians of interleaved repeats), so they hold on
any CPU; the table names the CPU it ran on. A row is written to ``<root>/comparison.json`` after each of its
parts (training, times, scores without and with control guidance, with ``--strength``), and a rerun with the
same arguments keeps the rows whose checkpoint exists and does only the parts they miss: an interrupted
comparison goes on where it stopped, a row whose training stopped resumes that run from its last
checkpoint. A run with other ``--injectors`` adds its rows to the others, which the table lists after its
own; ``--retime`` measures the times again from the checkpoints, on a quiet machine (``--sample-repeats``:
sampling calls each, 3 by default; the step takes 5).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from benchlib import cpu_name, interleaved_medians

from varctl.cli import run
from varctl.cli.config import compose, validate
from varctl.files import atomic_write_text
from varctl.models.control import CAR_OWN_LAYOUT, INJECTORS

CONF = Path(__file__).resolve().parents[1] / "conf" / "control.yaml"


def control_overrides(fields: dict) -> list[str]:
    """``model.control`` overrides that set ``fields`` (None as null)."""
    return [f"model.control.{k}={'null' if v is None else v}" for k, v in fields.items()]


# rows that are an injector with other settings than conf/control.yaml's: name -> (injector, overrides)
VARIANTS = {
    "car-own": ("car", control_overrides(CAR_OWN_LAYOUT)),
    "prefill-class": ("prefill", control_overrides({"prefix_condition": "class"})),
}
ROWS = [r for i in INJECTORS for r in (i, *(v for v, (j, _) in VARIANTS.items() if j == i))]


def stage(command: str, overrides: list[str]):
    return run(command, validate(compose(CONF, overrides), CONF), CONF)


def interleaved_ratio(a, b, repeats: int = 5) -> float:
    """median(time of a) / median(time of b), run alternately (``benchlib.interleaved_medians``)."""
    t = interleaved_medians({"a": a, "b": b}, repeats)
    return t["a"] / t["b"]


def timings(module, batch, repeats: int = 3) -> dict[str, float]:
    """Step and sampling time of the controlled VAR relative to the VAR alone, on one val batch (``repeats``
    sampling calls each)."""
    model, var = module.model, module.var
    cond = module.condition(batch)
    _, x = module.tokenize(batch["image"])
    maps = batch["control"]

    frozen = [p for p in var.parameters() if not p.requires_grad]

    def step(fn, tune_all: bool):
        def go():
            for p in frozen:  # the VAR alone trains all its weights (a stage-2 step)
                p.requires_grad_(tune_all)
            model.zero_grad(set_to_none=True)
            fn().float().logsumexp(-1).mean().backward()

        return go

    model.train()
    step_ratio = interleaved_ratio(
        step(lambda: model(cond, x, maps), False), step(lambda: var(cond, x), True)
    )
    for p in frozen:
        p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model.eval()
    kw = dict(cfg=3.0, top_k=0, top_p=0.0, seed=0, vae=module.vae)
    sample_ratio = interleaved_ratio(
        lambda: model.generate(cond, control_maps=maps, **kw), lambda: var.generate(cond, **kw), repeats
    )
    return {"step": step_ratio, "sample": sample_ratio}


def loaded(common: list[str], ckpt: str):
    """The trained module and a val batch, from a checkpoint (a validate run that scores nothing)."""
    trainer = stage("validate", [*common, f"ckpt_path={ckpt}", "trainer.limit_val_batches=1",
                                 "model.scores.batches=0"])  # fmt: skip
    return trainer.lightning_module, next(iter(trainer.datamodule.val_dataloader()))


def table(rows: dict, args, cpu: str) -> str:
    strength = f", strength [{args.strength}]" if args.strength else ""
    lines = [
        "| injector | params added | step vs VAR | sample vs VAR | val loss | F1 own | F1 other "
        f"| F1 ceiling | F1 own, control cfg {args.control_cfg:g} | F1++ guided | FD judge guided |"
        + (f" F1 own, guided{strength} | FD judge, guided{strength} |" if strength else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if strength else ""),
    ]

    def cell(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f}M | {r['step']:.2f}x | {r['sample']:.2f}x "
            f"| {r['val_loss']:.3f} | {r['f1']:.3f} | {r['f1_other']:.3f} | {r['f1_ceiling']:.3f} "
            f"| {r['f1_guided']:.3f} | {cell(r.get('f1pp_guided'))} | {cell(r.get('fd_judge_guided'))} |"
            + (f" {cell(r.get('f1_strength'))} | {cell(r.get('fd_judge_strength'))} |" if strength else "")
        )
    images = args.val_batches * 16
    return "\n".join(lines) + (
        f"\n\n{args.steps} steps each, seed 0, {images} val images, CPU {cpu}, torch {torch.__version__}\n"
    )


def score(metrics: dict, key: str) -> float | None:
    return float(metrics[key]) if key in metrics else None


def complete(row: dict) -> bool:
    """Whether a row holds every column (a row is saved after each of its parts: training, times, scores)."""
    return all(k in row for k in ("step", "f1", "f1_guided"))


def last_checkpoint(run_root: Path) -> Path | None:
    """The last.ckpt of the newest run under ``run_root`` (one row's runs), or None."""
    found = sorted(run_root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.parent.parent.name)
    return found[-1] if found else None


def names(args) -> list[str]:
    """The rows: every injector with the backbone frozen, then those of ``--tuned`` with it fine-tuned."""
    return [*args.injectors, *(f"{n} tuned" for n in args.tuned if n in args.injectors)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", required=True, help="stage-1 checkpoint (model.tokenizer)")
    parser.add_argument("--var", required=True, help="stage-2 checkpoint (model.init_from)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--injectors", nargs="+", default=ROWS, choices=ROWS,
                        help="car-own: car in CAR's own layout (the docstring)")  # fmt: skip
    parser.add_argument("--control-cfg", type=float, default=1.0, help="control guidance for 'F1 guided'")
    parser.add_argument("--control-drop-rate", type=float, default=0.1)
    parser.add_argument("--val-batches", type=int, default=4, help="scored val batches (16 images each)")
    parser.add_argument("--root", default="runs/compare")
    parser.add_argument("--judge", default=None, help="class judge file: adds the FD in its features")
    parser.add_argument("--retime", action="store_true", help="measure the times again from the checkpoints")
    parser.add_argument("--sample-repeats", type=int, default=3, help="sampling calls timed each (medians)")
    parser.add_argument("--strength", default=None, help="a control strength per scale also scored, e.g. "
                        "1,1,1,1,1.5,2 (the demo's)")  # fmt: skip
    tuned = "injectors also compared with the backbone fine-tuned (row '<name> tuned')"
    parser.add_argument("--tuned", nargs="*", default=["prefill"], choices=ROWS, help=tuned)
    parser.add_argument("overrides", nargs="*", help="more key=value overrides for every injector")
    args = parser.parse_args()
    if args.sample_repeats < 1:
        parser.error(f"--sample-repeats must be at least 1, found {args.sample_repeats}")

    root = Path(args.root)
    results = root / "comparison.json"
    rows: dict = {}
    if results.exists():  # resume: keep the finished rows of the same comparison
        saved = json.loads(results.read_text())
        free = ("injectors", "retime", "tuned", "strength", "sample_repeats")
        same = {k: v for k, v in saved["args"].items() if k not in free}
        if same != {k: v for k, v in vars(args).items() if k not in free}:
            raise SystemExit(f"{results} holds a comparison with other arguments: {saved['args']}; "
                             "use another --root or remove it")  # fmt: skip
        rows = {k: v for k, v in saved["rows"].items() if Path(v["checkpoint"]).exists()}

    def ordered() -> dict:
        """This run's rows in its order, then the rows of earlier runs with other ``--injectors``."""
        ours = names(args)
        return {k: rows[k] for k in [*ours, *sorted(set(rows) - set(ours))] if k in rows}

    def save() -> None:
        atomic_write_text(results, json.dumps({"args": vars(args), "rows": ordered()}, indent=1))

    save()  # the arguments first: an interrupted first row resumes only under the same ones

    judge = [f"model.evaluation.judge_weights={args.judge}"] if args.judge else []

    def scoring(ckpt) -> list[str]:
        return [f"ckpt_path={ckpt}", f"trainer.limit_test_batches={args.val_batches}",
                f"model.evaluation.batches={args.val_batches}", *judge]  # fmt: skip

    def with_strength(common: list[str], ckpt) -> dict:
        """F1 own and FD judge of the guided samples drawn with ``--strength``."""
        sampling = [f"model.evaluation.control_cfg={args.control_cfg}",
                    f"model.evaluation.control_strength=[{args.strength}]"]  # fmt: skip
        m = stage("test", [*common, *scoring(ckpt), *sampling]).callback_metrics
        return {"strength": args.strength, "f1_strength": float(m["test/edges_f1"]),
                "fd_judge_strength": score(m, "test/fd_judge")}  # fmt: skip

    for name in names(args):
        base = name.removesuffix(" tuned")
        (injector, settings), tuned = VARIANTS.get(base, (base, [])), base != name
        common = [
            f"model.tokenizer={args.tokenizer}", f"model.init_from={args.var}", f"run.root={root}",
            f"run.name=control_{name.replace(' ', '_')}", f"model.control.injector={injector}", "seed=0",
            f"model.control.control_drop_rate={args.control_drop_rate}", f"model.train_backbone={tuned}",
            *settings, *args.overrides,
        ]  # fmt: skip
        row = rows.get(name)
        if row is None:  # train, or go on with this row's interrupted training run
            resume = last_checkpoint(root / f"control_{name.replace(' ', '_')}")
            fitted = stage("fit", [*common, f"trainer.max_steps={args.steps}",
                                   *([f"ckpt_path={resume}"] if resume else [])])  # fmt: skip
            module = fitted.lightning_module
            row = rows[name] = {
                "params": sum(p.numel() for p in module.control.parameters() if p.requires_grad),
                "checkpoint": str(fitted.checkpoint_callback.last_model_path or resume),
            }
            row.update(timings(module, next(iter(fitted.datamodule.val_dataloader())), args.sample_repeats))
            save()
        elif args.retime or "step" not in row:
            row.update(timings(*loaded(common, row["checkpoint"]), args.sample_repeats))
            save()
        ckpt = row["checkpoint"]
        if "f1" not in row:
            plain = stage("test", [*common, *scoring(ckpt), "model.evaluation.control_cfg=0"])
            plain = plain.callback_metrics
            row.update({
                "val_loss": float(plain["test/loss"]), "f1": float(plain["test/edges_f1"]),
                "f1_other": float(plain["test_shuffled/edges_f1"]),
                "f1_ceiling": float(plain["test_tokenizer/edges_f1"]),
            })  # fmt: skip
            save()
        if "f1_guided" not in row:
            g = stage(
                "test", [*common, *scoring(ckpt), f"model.evaluation.control_cfg={args.control_cfg}"]
            ).callback_metrics
            row.update({
                "f1_guided": float(g["test/edges_f1"]), "f1_other_guided": float(g["test_shuffled/edges_f1"]),
                "f1pp_guided": float(g["test/edges_f1_controlnetpp"]),
                "fd_judge_guided": score(g, "test/fd_judge"),
                "fd_judge_ceiling": score(g, "test_tokenizer/fd_judge"),
            })  # fmt: skip
            save()
        if args.strength and row.get("strength") != args.strength:
            row.update(with_strength(common, ckpt))
            save()
        print(f"[compare] {name}: {row}", flush=True)

    text = table({k: r for k, r in ordered().items() if complete(r)}, args, cpu_name())
    print(text, flush=True)
    atomic_write_text(root / "comparison.md", text)


if __name__ == "__main__":
    main()
