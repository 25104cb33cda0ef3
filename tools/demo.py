"""The main job on the built-in dataset, end to end on a CPU: tokenizer -> class-conditional VAR -> samples
-> control branch (edges -> images) -> control-to-image samples.

    python tools/demo.py [--tokenizer-steps N] [--var-steps N] [--control-steps N] [--root runs]
                         [--no-score] [--no-control]

Each stage is the same as ``python -m varctl fit -c conf/....yaml`` (step counts from the config unless
given); the VAR stage gets the tokenizer's last checkpoint as ``model.tokenizer``, ``predict`` writes sample
PNGs under the VAR run directory, and ``tools/score_samples.py`` then reports how often a sample shows the
class it was generated for. ``test`` then scores samples for the test images' classes in that judge's
features (``fd_judge``, ``kd_judge``, ...; ``<run>/eval/test.json``). The control stage trains a branch on
that VAR (``conf/control.yaml``), reports the edge F1 of its samples against the real images beside the F1,
against the same images, of samples given other images' edges (what ignoring the control would give),
``test`` scores it the same way with generation quality beside, and ``predict`` writes each sample beside
its edge map and the real image.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from varctl.callbacks import ImageWriter
from varctl.cli import run
from varctl.cli.config import compose, validate

CONF = Path(__file__).resolve().parents[1] / "conf"


def stage(command: str, file: str, overrides: list[str]):
    path = CONF / file
    data = validate(compose(path, overrides), path)
    start = time.perf_counter()
    trainer = run(command, data, path)
    print(
        f"[demo] {command} {file}: {time.perf_counter() - start:.0f} s, run directory {trainer.log_dir}",
        flush=True,
    )
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer-steps", type=int, default=None, help="default: conf/tokenizer.yaml")
    parser.add_argument("--var-steps", type=int, default=None, help="default: conf/var.yaml")
    parser.add_argument("--control-steps", type=int, default=None, help="default: conf/control.yaml")
    parser.add_argument("--no-control", action="store_true", help="stop after the class-conditional VAR")
    parser.add_argument("--root", default="runs", help="where the run directories go")
    parser.add_argument("--no-score", action="store_true", help="skip scoring the samples")
    args = parser.parse_args()

    def steps(n: int | None) -> list[str]:
        return [] if n is None else [f"trainer.max_steps={n}"]

    tok = stage("fit", "tokenizer.yaml", [*steps(args.tokenizer_steps), f"run.root={args.root}"])
    tokenizer = tok.checkpoint_callback.last_model_path
    var_overrides = [f"model.tokenizer={tokenizer}", f"run.root={args.root}"]
    var = stage("fit", "var.yaml", [*steps(args.var_steps), *var_overrides])
    last = var.checkpoint_callback.last_model_path
    pred = stage("predict", "var.yaml", [f"ckpt_path={last}", *var_overrides])
    judge = []  # the class judge's features score generation quality in `test` (no FID weights here)
    if not args.no_score:
        out = next(c.output_dir for c in pred.callbacks if isinstance(c, ImageWriter))
        cache = Path(args.root) / "classifiers"
        tool = Path(__file__).with_name("score_samples.py")
        subprocess.run([sys.executable, str(tool), str(out), "--cache", str(cache)], check=True)
        newest = max(cache.glob("*.pt"), key=lambda p: p.stat().st_mtime)
        judge = [f"model.evaluation.judge_weights={newest}"]
        stage("test", "var.yaml", [f"ckpt_path={last}", *var_overrides, *judge])  # <run>/eval/test.json
    if not args.no_control:
        control_overrides = [
            f"model.tokenizer={tokenizer}",
            f"model.init_from={last}",
            f"run.root={args.root}",
        ]
        ctl = stage("fit", "control.yaml", [*steps(args.control_steps), *control_overrides])
        ckpt = ctl.checkpoint_callback.last_model_path
        # the control strength per scale that scored best (README, "What the demo shows"): 1, and 1.5 and 2
        # at the last two scales; the config's 1 is shown beside it
        K = ctl.lightning_module.var.config.num_scales
        boost = "[" + ",".join(["1"] * max(K - 2, 0) + ["1.5", "2"][-K:]) + "]"
        sampling = [f"model.{s}.control_strength={boost}" for s in ("scores", "evaluation", "predict")]
        scoring = ["trainer.limit_val_batches=4", "model.scores.batches=4"]  # 64 val images

        def f1(*overrides: str):
            scored = stage("validate", "control.yaml", [f"ckpt_path={ckpt}", *scoring, *control_overrides,
                                                        *overrides])  # fmt: skip
            return scored.callback_metrics, float(scored.lightning_module.scoring.control_cfg)

        m, guidance = f1(*sampling)
        print(
            f"[demo] control ({ctl.lightning_module.control.config.injector}, control guidance {guidance:g}, "
            f"control strength {boost}): edge F1 of samples vs. their real images "
            f"{float(m['val/edges_f1']):.3f}; of samples given other images' edges "
            f"{float(m['val_shuffled/edges_f1']):.3f} (no control); of the tokenizer's reconstructions "
            f"{float(m['val_tokenizer/edges_f1']):.3f} (the ceiling)",
            flush=True,
        )
        plain = float(f1(*sampling, "model.scores.control_cfg=0")[0]["val/edges_f1"])
        flat = float(f1()[0]["val/edges_f1"])
        print(f"[demo] control without control guidance: edge F1 {plain:.3f}; with strength 1 at every "
              f"scale: {flat:.3f}", flush=True)  # fmt: skip
        if judge:
            stage("test", "control.yaml", [f"ckpt_path={ckpt}", *control_overrides, *judge, *sampling])
        stage("predict", "control.yaml", [f"ckpt_path={ckpt}", *control_overrides, *sampling])
    print(f"[demo] done: tensorboard --logdir {args.root}", flush=True)


if __name__ == "__main__":
    main()
