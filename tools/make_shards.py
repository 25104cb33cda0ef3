"""Write the splits of any datamodule as litdata shards, which data=shards streams (datamodules/shards.py).

    python tools/make_shards.py --out shards/scenes64 --resolution 64 data=synthetic_simple
    python tools/make_shards.py --out shards/pairs --resolution 256 data=pairs data.root=MY_PAIRS
    python -m varctl fit -c conf/var.yaml data=shards data.root=shards/scenes64

The data section is composed from a stage config (-c, default conf/var.yaml; ``data=GROUP`` picks any file of
conf/data/) with the overrides and checked as the CLI checks it, built through Hydra's instantiate,
connected at --resolution with every batch key (captions and control maps are stored when the data gives
them) and set up. Each split is written with ``litdata.optimize`` in the source's order, read back (count,
order, the largest segmentation id), and described in meta/. Train samples are written as val samples are,
without flips or random crops: data=shards flips when it reads (``data.flip``). The output folder is
written atomically (a temporary folder renamed into place) and an existing one is refused unless
--overwrite. Upload it to a bucket as it is to stream it from there (``data.root=s3://...``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from litdata import StreamingDataset, optimize
from omegaconf import OmegaConf

from datamodules import BATCH_KEYS
from datamodules.shards import FORMAT, META, encode_sample, meta_item
from varctl.cli.config import ConfigError, compose, to_container, validate_section
from varctl.files import atomic_dir

CONF = Path(__file__).resolve().parents[1] / "conf"
# litdata's recommended chunk size: large enough for streaming throughput. Its shuffle permutes the chunks,
# then the items within each, so a batch mixes few chunks: smaller chunks shuffle better, read slower.
CHUNK_BYTES = "64MB"


class Encoder:
    """optimize's fn, run in litdata's worker processes: sample i of a dataset as its shard item."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __call__(self, index: int) -> dict:
        torch.set_num_threads(1)  # as in DataLoader workers: the processes are the parallelism
        return encode_sample(self.dataset[index], index)


def build_data(config: Path, overrides: list[str], resolution: int | None):
    """The source datamodule, connected and set up, with its data section and what was changed in it."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    cfg = compose(config, overrides)
    # The data section alone: the stage's model (an earlier stage's run, say) need not exist.
    section = validate_section(to_container(OmegaConf.masked_copy(cfg, ["data"]), config), "data", config)
    changed = []
    if float(section.get("flip") or 0.0) > 0:
        section["flip"] = 0.0
        changed.append("data.flip=0")
    if section.get("crop") == "random":
        section["crop"] = "center"
        changed.append("data.crop=center")
    resolution = resolution or section.get("resolution")
    if resolution is None:
        raise ConfigError(
            f"{config}: no resolution: pass --resolution N, the resolution of the model that will train on "
            "the shards (its tokenizer's), or set data.resolution"
        )
    try:
        datamodule = instantiate(section, _convert_="all")
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, FileNotFoundError)):
            raise ConfigError(f"{config}: data: {e.__cause__}") from e.__cause__
        raise
    datamodule.connect(int(resolution), BATCH_KEYS)
    datamodule.setup()
    return datamodule, section, changed


def write_split(dataset, folder: Path, chunk_bytes: str, workers: int) -> tuple[list[str], int | None]:
    """Write ``dataset`` to ``folder`` in its order; returns the stored maps and the largest segmentation id,
    read back from the shards (which also checks that every sample is there, in order)."""
    optimize(
        fn=Encoder(dataset),
        inputs=list(range(len(dataset))),
        output_dir=str(folder),
        chunk_bytes=chunk_bytes,
        num_workers=max(1, min(workers, len(dataset))),
        keep_data_ordered=True,  # each worker writes a slice in order, so the shards keep the source's order
        reorder_files=False,
        start_method="fork",  # as torch's DataLoader on Linux: the built dataset is shared, not re-imported
        verbose=False,
    )
    controls, tops, count = [], [], 0
    for item in StreamingDataset(str(folder)):
        if item["index"] != count:
            raise RuntimeError(f"{folder}: sample {item['index']} stored at position {count}")
        controls = list(item["control"])
        if "segmentation" in item["control"]:
            tops.append(int(item["control"]["segmentation"].max()))
        count += 1
    if count != len(dataset):
        raise RuntimeError(f"{folder}: {count} samples stored, {len(dataset)} written")
    return controls, max(tops, default=None)


def write_shards(datamodule, section: dict, folder: Path, chunk_bytes: str, workers: int) -> dict:
    """Every split of ``datamodule`` under ``folder`` (train/, val/, test/) and meta/; returns the meta."""
    splits, controls, tops = {}, [], []
    for split, dataset in datamodule.datasets.items():
        if split == "predict":  # generation inputs, not data
            continue
        start = time.perf_counter()
        controls, top = write_split(dataset, folder / split, chunk_bytes, workers)
        tops += [] if top is None else [top]
        splits[split] = len(dataset)
        seconds = time.perf_counter() - start
        print(f"[make_shards] {split}: {len(dataset)} samples in {seconds:.1f} s", flush=True)
    meta = {
        "format": FORMAT,
        "resolution": datamodule.resolution,
        "splits": splits,
        "class_names": datamodule.class_names,
        "controls": controls,
        "max_segment_id": max(tops, default=None),
        "image": "png",
        "source": section,
    }
    text = json.dumps(meta, default=str)
    optimize(meta_item, [text], str(folder / META), chunk_bytes=chunk_bytes, num_workers=1, verbose=False,
             start_method="fork")  # fmt: skip
    return meta


def size_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--out", required=True, help="the folder to write (a local path)")
    add("--resolution", type=int, default=None, help="side in pixels (default: data.resolution)")
    add("-c", "--config", default=str(CONF / "var.yaml"), help="the stage config whose data section is used")
    add("--chunk-bytes", default=CHUNK_BYTES, help=f"litdata chunk size (default {CHUNK_BYTES})")
    add("--workers", type=int, default=min(8, os.cpu_count() or 1), help="writer processes")
    add("--overwrite", action="store_true", help="replace an existing --out folder")
    add("overrides", nargs="*", metavar="key=value", help="Hydra overrides, e.g. data=folder data.root=DIR")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if "://" in args.out:
            raise ConfigError(f"--out {args.out}: write to a local folder, then upload it as it is")
        if out.exists() and not args.overwrite:
            raise ConfigError(f"--out {out} exists; pass --overwrite to replace it")
        datamodule, section, changed = build_data(Path(args.config), args.overrides, args.resolution)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"make_shards: {e}", file=sys.stderr)
        return 2
    if changed:
        print(f"[make_shards] train samples written as val samples: {', '.join(changed)} "
              "(data=shards flips when it reads: data.flip)", flush=True)  # fmt: skip
    start = time.perf_counter()
    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        meta = write_shards(datamodule, section, tmp, args.chunk_bytes, args.workers)
    splits = ", ".join(f"{s} {n}" for s, n in meta["splits"].items())
    classes = "no class names" if meta["class_names"] is None else f"{len(meta['class_names'])} classes"
    seconds, mib = time.perf_counter() - start, size_of(out) / 2**20
    print(
        f"[make_shards] wrote {out}: {splits} samples at {meta['resolution']} px, {classes}, maps "
        f"{meta['controls'] or 'none'}, {mib:.1f} MiB in {seconds:.1f} s\n"
        f"[make_shards] train on it: python -m varctl fit -c conf/var.yaml data=shards data.root={out}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
