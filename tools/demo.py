"""The main job on the built-in dataset, end to end on a CPU: tokenizer -> class-conditional VAR -> samples.

    python tools/demo.py [--tokenizer-steps N] [--var-steps N] [--root runs]

Each stage is the same as ``python -m varctl fit -c conf/....yaml``; the VAR stage gets the tokenizer's last
checkpoint as ``model.tokenizer``, and ``predict`` writes sample PNGs under the VAR run directory.
(The control stage does not exist yet: this runs the most complete stages available.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from varctl.cli import run
from varctl.config import compose, validate

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
    parser.add_argument("--tokenizer-steps", type=int, default=1500)
    parser.add_argument("--var-steps", type=int, default=1500)
    parser.add_argument("--root", default="runs", help="where the run directories go")
    args = parser.parse_args()

    tok = stage(
        "fit", "tokenizer.yaml", [f"trainer.max_steps={args.tokenizer_steps}", f"run.root={args.root}"]
    )
    tokenizer = tok.checkpoint_callback.last_model_path
    var_overrides = [f"model.tokenizer={tokenizer}", f"run.root={args.root}"]
    var = stage("fit", "var.yaml", [f"trainer.max_steps={args.var_steps}", *var_overrides])
    last = var.checkpoint_callback.last_model_path
    stage("predict", "var.yaml", [f"ckpt_path={last}", *var_overrides])
    print(f"[demo] done: tensorboard --logdir {args.root}", flush=True)


if __name__ == "__main__":
    main()
