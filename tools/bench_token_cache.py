"""Stage-2 training steps per second from images (the frozen tokenizer encodes every batch) and from a token
cache (``model.token_cache``, datamodules/token_cache.py), side by side in one process.

    python tools/bench_token_cache.py [--stage var|control] [--steps 20] [--rounds 3] [--batch-size 16]
                                      [--flip 0.5]

The demo's shapes: ``conf/var.yaml`` (VAR d4 at 64 px on the built-in synthetic_simple scenes) on a tokenizer
of ``conf/tokenizer.yaml``'s architecture with random weights (speed does not depend on the weights). A step
is what ``fit`` does per batch: load the batch (control maps none; the scenes are drawn, except from the
cache, where the VAR stage reads no pixels), tokenize it or read its cached tokens, forward, backward,
AdamW. ``--stage control``: the control stage of ``conf/control.yaml`` (the demo's car branch on that VAR,
frozen, with random weights) on the scenes with their edge maps, which are drawn from the cache too (the
maps come from the scenes), AdamW over the branch. The two loops alternate for ``--rounds`` rounds of
``--steps`` steps; the medians' ratio is printed. (That the cached run's losses equal the uncached run's is
tested: tests/test_token_cache.py.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import cpu_name, steady_allocator
from torch.utils.data import DataLoader

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
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--flip", type=float, default=0.5)
    args = parser.parse_args()

    tok_conf = validate(compose(CONF / "tokenizer.yaml", []), CONF / "tokenizer.yaml")
    var_conf = validate(compose(CONF / "var.yaml", ["model.tokenizer=unused"]), CONF / "var.yaml")
    conf = var_conf
    if args.stage == "control":
        unused = ["model.tokenizer=unused", "model.init_from=unused"]
        conf = validate(compose(CONF / "control.yaml", unused), CONF / "control.yaml")
    data = {k: v for k, v in conf["data"].items() if k != "_target_"}
    data.update(batch_size=args.batch_size, num_train=args.num_train, flip=args.flip, num_workers=0)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        vae_file = VQVAE.build(tok_conf["model"]["vqvae"]).save(Path(tmp) / "vae.pt")
        module = VARModule(str(vae_file), var=var_conf["model"]["var"])
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

        def run(kind: str) -> float:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                try:
                    batch = next(iters[kind])
                except StopIteration:
                    iters[kind] = iter(loaders[kind])
                    batch = next(iters[kind])
                loss_BL, _ = module.token_losses(batch, module.model)
                loss = loss_BL.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return args.steps / (time.perf_counter() - t0)

        steady_allocator()
        run("images"), run("cache")  # warm-up
        iters = {k: iter(v) for k, v in loaders.items()}
        rates: dict[str, list[float]] = {"images": [], "cache": []}
        for _ in range(args.rounds):
            rates["images"].append(run("images"))
            rates["cache"].append(run("cache"))
        img, cached = statistics.median(rates["images"]), statistics.median(rates["cache"])
        print(f"CPU {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        depth, res = var_conf["model"]["var"]["depth"], module.vae.config.resolution
        stage = "VAR stage" if args.stage == "var" else f"control stage ({module.control.config.injector})"
        print(f"{stage}, VAR d{depth} at {res} px, batch {args.batch_size}, flip {args.flip}; "
              f"cache of {len(cache)} images built in {build_s:.1f} s")  # fmt: skip
        print(
            f"steps/s from images {img:.2f}, from the token cache {cached:.2f}: {cached / img:.2f}x "
            f"(medians of {args.rounds} interleaved rounds of {args.steps} steps)"
        )


if __name__ == "__main__":
    main()
