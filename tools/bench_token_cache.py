"""Stage-2 training steps per second from images (the frozen tokenizer encodes every batch) and from a token
cache (``model.token_cache``, datamodules/token_cache.py), side by side in one process.

    python tools/bench_token_cache.py [--stage var|control] [--steps 20] [--rounds 3] [--batch-size 16]
                                      [--flip 0.5] [--official-shapes] [--bf16]

The demo's shapes: ``conf/var.yaml`` (VAR d4 at 64 px on the built-in synthetic_simple scenes) on a tokenizer
of ``conf/tokenizer.yaml``'s architecture with random weights (speed does not depend on the weights). A step
is what ``fit`` does per batch: load the batch (control maps none; the scenes are drawn, except from the
cache, where the VAR stage reads no pixels), tokenize it or read its cached tokens, forward, backward,
AdamW. ``--stage control``: the control stage of ``conf/control.yaml`` (the demo's car branch on that VAR,
frozen, with random weights) on the scenes with their edge maps, which are drawn from the cache too (the
maps come from the scenes), AdamW over the branch. The two loops alternate for ``--rounds`` rounds of
``--steps`` steps; the medians' ratio is printed. ``--official-shapes``: the same at the official shapes, a
d16 VAR (width 1024) on the official tokenizer's architecture (``vae_ch160v4096z32``) at 256 px, batch 2 by
default (minutes a round on a CPU: try ``--steps 2 --rounds 2 --num-train 40``). (That the cached run's
losses equal the uncached run's is tested: tests/test_token_cache.py.)

It also prints what the cache can gain at most on this machine: each loop's milliseconds per step spent
loading the batch and making its tokens (and teacher-forcing input), against the rest of the step; and the
rest's floating-point work (``torch.utils.flop_counter``, one step) at the machine's fastest float32 matmul
rate (a 2048 x 2048 product through MKL and through oneDNN, measured here). Were the rest of the step
nothing but matmuls at that rate, the cache's speed-up would be (that time + the images' loading and tokens)
/ (that time + the cache's). ``--bf16``: the step under bfloat16 autocast, as ``trainer.precision=bf16-mixed``
runs it (the tokenizer stays float32, so the tokens are the cache's), against the bfloat16 matmul rate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import cpu_name, steady_allocator, timed
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.synthetic import SyntheticDataModule  # noqa: E402
from datamodules.token_cache import CachedTokens, TokenCache  # noqa: E402
from datamodules.transforms import collate  # noqa: E402
from varctl.cli.config import compose, validate  # noqa: E402
from varctl.lit.control import ControlModule  # noqa: E402
from varctl.lit.var import VARModule  # noqa: E402
from varctl.models.vqvae import VQVAE  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--stage", choices=["var", "control"], default="var")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="16; 2 with --official-shapes")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--flip", type=float, default=0.5)
    parser.add_argument(
        "--official-shapes", action="store_true", help="d16 on the official tokenizer, 256 px"
    )
    parser.add_argument("--bf16", action="store_true", help="the step under bf16 autocast (bf16-mixed)")
    args = parser.parse_args()
    args.batch_size = args.batch_size or (2 if args.official_shapes else 16)

    tok_conf = validate(compose(CONF / "tokenizer.yaml", []), CONF / "tokenizer.yaml")
    var_conf = validate(compose(CONF / "var.yaml", ["model.tokenizer=unused"]), CONF / "var.yaml")
    conf = var_conf
    if args.stage == "control":
        unused = ["model.tokenizer=unused", "model.init_from=unused"]
        conf = validate(compose(CONF / "control.yaml", unused), CONF / "control.yaml")
    data = {k: v for k, v in conf["data"].items() if k != "_target_"}
    data.update(batch_size=args.batch_size, num_train=args.num_train, flip=args.flip, num_workers=0)
    vae_config, var_config = tok_conf["model"]["vqvae"], var_conf["model"]["var"]
    if args.official_shapes:
        vae_config, var_config = "vae_ch160v4096z32", {**var_config, "depth": 16}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        vae_file = VQVAE.build(vae_config).save(Path(tmp) / "vae.pt")
        module = VARModule(str(vae_file), var=var_config)
        if args.stage == "control":
            var_file = module.var.save(Path(tmp) / "var.pt")
            module = ControlModule(str(vae_file), str(var_file), control=conf["model"]["control"])
        dm = SyntheticDataModule(**data)
        dm.connect(**module.data_requirements())
        dm.setup("fit")
        train = dm.dataset("train")
        start = time.perf_counter()
        cache = TokenCache.build(train, module.vae, Path(tmp) / "tokens", {})
        build_s = time.perf_counter() - start
        loaders = {
            "images": DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                                 generator=torch.Generator().manual_seed(0)),
            "cache": DataLoader(CachedTokens(train, cache, pixels=module.train_needs_pixels),
                                batch_size=args.batch_size,
                                shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(0)),
        }  # fmt: skip
        opt = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-4)
        module.train()
        iters = {k: iter(v) for k, v in loaders.items()}

        spent = {"load": 0.0, "tokens": 0.0}  # seconds since the last reset
        tokens_of = module.tokens_of

        def timed_tokens_of(batch: dict):
            t0 = time.perf_counter()
            out = tokens_of(batch)
            spent["tokens"] += time.perf_counter() - t0
            return out

        module.tokens_of = timed_tokens_of

        def step(batch: dict) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss_BL, _ = module.token_losses(batch, module.model)
                loss = loss_BL.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def run(kind: str) -> dict[str, float]:
            """Steps per second and the milliseconds per step of loading and tokens."""
            spent.update(load=0.0, tokens=0.0)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                t1 = time.perf_counter()
                try:
                    batch = next(iters[kind])
                except StopIteration:
                    iters[kind] = iter(loaders[kind])
                    batch = next(iters[kind])
                spent["load"] += time.perf_counter() - t1
                step(batch)
            total = time.perf_counter() - t0
            per_step = {k: 1000 * v / args.steps for k, v in spent.items()}
            return {"rate": args.steps / total, **per_step, "step": 1000 * total / args.steps}

        steady_allocator()
        run("images"), run("cache")  # warm-up
        iters = {k: iter(v) for k, v in loaders.items()}
        rounds: dict[str, list[dict[str, float]]] = {"images": [], "cache": []}
        for _ in range(args.rounds):
            rounds["images"].append(run("images"))
            rounds["cache"].append(run("cache"))
        med = {
            kind: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for kind, rs in rounds.items()
        }
        img, cached = med["images"]["rate"], med["cache"]["rate"]
        batch = next(iter(loaders["cache"]))
        rest_gflop = (_flops_of(step, batch) - _flops_of(tokens_of, batch)) / 1e9
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        precision = str(dtype).removeprefix("torch.")
        rates = _matmul_gflops(dtype)
        peak = max(rates.values())
        print(f"CPU {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        depth, res = module.var.config.depth, module.vae.config.resolution
        stage = "VAR stage" if args.stage == "var" else f"control stage ({module.control.config.injector})"
        print(f"{stage}, VAR d{depth} at {res} px, batch {args.batch_size}, flip {args.flip}, {precision}; "
              f"cache of {len(cache)} images built in {build_s:.1f} s")  # fmt: skip
        print(
            f"steps/s from images {img:.2f}, from the token cache {cached:.2f}: {cached / img:.2f}x "
            f"(medians of {args.rounds} interleaved rounds of {args.steps} steps)"
        )
        for kind, m in med.items():
            rest = m["step"] - m["load"] - m["tokens"]
            print(f"  {kind:>6}: {m['step']:.0f} ms a step: loading {m['load']:.1f}, "
                  f"tokens {m['tokens']:.1f}, the rest {rest:.0f} ms")  # fmt: skip
        bound_ms = 1000 * rest_gflop / peak
        feeding = {k: med[k]["load"] + med[k]["tokens"] for k in med}  # what the cache can take away
        rates_text = ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
        print(
            f"the rest of a step: {rest_gflop:.1f} GFLOP, at least {bound_ms:.0f} ms at this machine's "
            f"fastest {precision} matmul rate ({rates_text} GFLOP/s); "
            "so the cache's speed-up is at most "
            f"{(bound_ms + feeding['images']) / (bound_ms + feeding['cache']):.2f}x here"
        )


def _flops_of(fn, *args) -> int:
    """Floating-point operations of one call of ``fn``."""
    with FlopCounterMode(display=False) as flops:
        fn(*args)
    return flops.get_total_flops()


def _matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """The machine's matmul rates in ``dtype``: the fastest of ``repeats`` products of two n x n matrices.
    In float32 through MKL (``a @ b``, what training runs) and through oneDNN (varctl's inference linear
    layers, ``varctl.models.kernels``; faster on AVX-512 CPUs), where PyTorch has it; bfloat16 products are
    oneDNN's."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    kernels = {"MKL" if dtype == torch.float32 else "oneDNN": lambda: a @ b}
    onednn = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if dtype == torch.float32 and onednn is not None and torch.backends.mkldnn.is_available():
        kernels["oneDNN"] = lambda: onednn(a, b, None, "none", [], "")
    rates = {}
    for name, fn in kernels.items():
        fn()
        rates[name] = 2 * n**3 / min(timed(fn)[0] for _ in range(repeats)) / 1e9
    return rates


if __name__ == "__main__":
    main()
