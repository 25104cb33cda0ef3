"""Write the splits of any datamodule as litdata shards, which data=shards streams (datamodules/shards.py).

    python tools/make_shards.py --out shards/scenes64 --resolution 64 data=synthetic_simple
    python tools/make_shards.py --out shards/pairs --resolution 256 data=pairs data.root=MY_PAIRS
    python -m varctl fit -c conf/var.yaml data=shards data.root=shards/scenes64

The data section is composed from a stage config (-c, default conf/var.yaml; ``data=GROUP`` picks any file of
conf/data/) with the overrides and checked as the CLI checks it, built through Hydra's instantiate,
connected at --resolution with every batch key (captions and control maps are stored when the data gives
them) and set up. Each split is written with ``litdata.optimize`` in the source's order, read back (count,
order, the largest segmentation id), and described in meta/. Train samples are written as val samples are,
without flips or random crops: data=shards flips when it reads (``data.flip``). Upload the folder to a bucket
as it is to stream it from there (``data.root=s3://...``).

The output folder appears complete or not at all, and a conversion that stops goes on where it stopped: it is
written in ``.<name>.partial/`` beside --out, which keeps job.json (the source section, resolution, chunk
size, writer processes and the splits done) and litdata's checkpoints (``use_checkpoint``: a worker's
position after each chunk it wrote), and is renamed to --out at the end. The same command run again after a
crash, Ctrl-C or SIGTERM goes on from the last chunks written and gives the same shards; the work folder of
another conversion is discarded. An existing --out is refused unless --overwrite, which replaces a shard
folder (meta/ and the splits it lists, each holding its index.json and chunks, nothing else) and nothing else;
an --out that is, holds or lies inside an input of the source (data.root, a list file, an image folder) is
always refused, before anything is written. The new folder is swapped in with the old in one step
(renameat2's RENAME_EXCHANGE; elsewhere two renames), then the old one deleted.

A source file that fails to load is an error naming it, its split and index (exit 1): the datamodule's
fall-back to the next sample would store a duplicate. The check of the source files before the conversion
(``data.check_files``) writes its report to ``<out>.data_report.json`` beside the shards.

litdata runs in a child process in a process group of its own, which the converter kills when it stops for
any reason: litdata ends a Ctrl-C with exit status 0 (its SIGINT handler calls ``os._exit(0)``) and, when a
sample fails in a worker, leaves that worker's helper process blocked for ever (holding the terminal's pipes
open). Here a failing sample is an error naming it (exit 1), an interruption exits 130 / 143, and nothing of
litdata outlives the converter: on Linux the child is also told when the converter dies unwarned (kill -9),
and then kills its group.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
from litdata import StreamingDataset, optimize
from omegaconf import OmegaConf

from datamodules import BATCH_KEYS
from datamodules.files import FileDataModule
from datamodules.shards import FORMAT, INDEX, META, encode_sample, meta_item, read_index, read_meta
from datamodules.verify import REPORT_NAME
from varctl.cli.config import ConfigError, compose, to_container, validate_section
from varctl.files import atomic_write_text, publish_dir, writer_id, writer_running

CONF = Path(__file__).resolve().parents[1] / "conf"
# litdata's recommended chunk size: large enough for streaming throughput. Its shuffle permutes the chunks,
# then the items within each, so a batch mixes few chunks: smaller chunks shuffle better, read slower.
CHUNK_BYTES = "64MB"


class Encoder:
    """optimize's fn, run in litdata's worker processes: sample i of a dataset as its shard item. A sample
    that fails is reported on ``errors`` (by name and cause) before litdata wraps it in its own traceback."""

    def __init__(self, dataset, split: str, errors=None):
        self.dataset, self.split, self.errors = dataset, split, errors

    def __call__(self, index: int) -> dict:
        torch.set_num_threads(1)  # as in DataLoader workers: the processes are the parallelism
        try:
            with warnings.catch_warnings(record=True) as caught:
                sample = self.dataset[index]
            # FileDataset returns the next usable sample in place of one whose file fails (and says so):
            # here that is an error, or the shards would hold a duplicate for good.
            failed = getattr(self.dataset, "_unusable", {}).get(index)
            if failed is not None:
                raise OSError(f"{failed} (a sample that fails is not replaced in shards)")
            for w in caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            return encode_sample(sample, index)
        except Exception as e:
            if self.errors is not None:
                self.errors.put(f"{self.split} sample {index}: {type(e).__name__}: {e}"[:1000])
            raise


def report_file(out: Path) -> Path:
    return out.parent / f"{out.name}.{REPORT_NAME}"


def inputs_of(section, key: str = "data") -> list[tuple[str, Path]]:
    """The (key, path) of every string of the data section that names an existing local file or folder."""
    if isinstance(section, dict):
        return [found for k, v in section.items() for found in inputs_of(v, f"{key}.{k}")]
    if isinstance(section, list):
        return [found for i, v in enumerate(section) for found in inputs_of(v, f"{key}[{i}]")]
    if isinstance(section, str) and "://" not in section and section and os.path.exists(section):
        return [(key, Path(section))]
    return []


def check_out(out: Path, section: dict, datamodule) -> None:
    """Refuse an --out that is, holds or lies inside an input of the source: a path of its data section, or
    a folder of its files (a list file's images may be anywhere)."""
    inputs = inputs_of(section)
    if isinstance(datamodule, FileDataModule):  # the files found (none read yet)
        files = {
            path
            for records in datamodule.splits.values()
            for r in records
            for path in (r.image, *r.maps.values())
        }
        inputs += [
            ("folder of image or map files", folder) for folder in sorted({Path(f).parent for f in files})
        ]
    target = out.resolve()
    for key, path in inputs:
        path = path.resolve()
        if target == path or path in target.parents:
            how = "is" if target == path else "lies inside"
        elif target in path.parents:
            how = "holds"
        else:
            continue
        raise ConfigError(
            f"--out {out} {how} the source's {key} ({path}): write the shards to a folder of their own"
        )


def build_data(config: Path, overrides: list[str], resolution: int | None, out: Path | None = None):
    """The source datamodule, connected and set up, with its data section and what was changed in it; an
    ``out`` among its inputs is refused first, and the check of its files is reported beside ``out``."""
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
    if out is not None:
        check_out(out, section, datamodule)
        if getattr(datamodule, "report_file", "") is None:  # no run directory here: beside the shards
            datamodule.report_file = str(report_file(out))
    datamodule.connect(int(resolution), BATCH_KEYS)
    datamodule.setup()
    for dataset in datamodule.datasets.values():  # a file failing here is an error (Encoder), not an event
        if hasattr(dataset, "events_file"):
            dataset.events_file = None
    return datamodule, section, changed


def optimize_split(dataset, split: str, folder: Path, chunk_bytes: str, workers: int, errors) -> None:
    """Write ``dataset`` to ``folder`` in its order with litdata, going on from the checkpoints there."""
    optimize(
        fn=Encoder(dataset, split, errors),
        inputs=list(range(len(dataset))),
        output_dir=str(folder),
        chunk_bytes=chunk_bytes,
        num_workers=max(1, min(workers, len(dataset))),
        keep_data_ordered=True,  # each worker writes a slice in order, so the shards keep the source's order
        reorder_files=False,
        use_checkpoint=True,  # each worker records its position after each chunk: a stopped run goes on
        start_method="fork",  # as torch's DataLoader on Linux: the built dataset is shared, not re-imported
        verbose=False,
    )


def optimize_meta(text: str, folder: Path, errors) -> None:
    optimize(meta_item, [text], str(folder), chunk_bytes=CHUNK_BYTES, num_workers=1, verbose=False,
             start_method="fork")  # fmt: skip


last_group: int | None = None  # the process group of the last isolated call (tests check that it is gone)


def _die_with(parent: int) -> None:
    """Kill this process group when ``parent`` dies, kill -9 included (Linux: prctl's PR_SET_PDEATHSIG sends
    SIGTERM, handled here in the group's leader; elsewhere nothing)."""
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is None:
        return
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
    prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG (linux/prctl.h)
    if os.getppid() != parent:  # died before that
        os.killpg(0, signal.SIGKILL)


def _group_leader(target, args: tuple, errors, parent: int) -> None:
    """A child process, leader of a new process group, that runs ``target(*args, errors)``; what it raised
    is put on ``errors`` (after what its workers put there)."""
    os.setpgid(0, 0)
    _die_with(parent)
    try:
        target(*args, errors)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        errors.put(f"{type(e).__name__}: {e}"[:1000])
        os._exit(1)
    os._exit(0)


def isolated(target, *args) -> None:
    """Run ``target(*args, errors)`` in a child process in a process group of its own and kill that group
    when it is done, failed or interrupted, so nothing it started is left running (litdata's helpers
    included); RuntimeError with the first message on ``errors`` when it failed. Ctrl-C and SIGTERM reach
    this process alone (the child's group is not the terminal's)."""
    global last_group
    context = multiprocessing.get_context("fork")
    errors = context.SimpleQueue()  # short messages only: a full pipe would block the child
    child = context.Process(target=_group_leader, args=(target, args, errors, os.getpid()))
    try:
        child.start()
        last_group = child.pid
        child.join()
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, TypeError):  # the group is gone already, or never made
            pass
        child.join()
    if child.exitcode != 0:
        raise RuntimeError(errors.get() if not errors.empty() else f"exit status {child.exitcode}")


def write_split(dataset, folder: Path, chunk_bytes: str, workers: int) -> tuple[list[str], int | None]:
    """Write ``dataset`` to ``folder`` in its order; returns the stored maps and the largest segmentation id,
    read back from the shards (which also checks that every sample is there, in order)."""
    if folder.exists() and not (folder / ".checkpoints" / "config.json").exists():
        shutil.rmtree(folder)  # stopped before litdata recorded anything, or after it finished: write it anew
    isolated(optimize_split, dataset, folder.name, folder, chunk_bytes, workers)
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


def shard_folder_problem(folder: Path) -> str:
    """Why --overwrite may not replace ``folder``: "" for an empty folder or one this converter wrote (meta/
    and the splits it lists, each holding its index.json and the chunks it lists, nothing else)."""
    if not folder.is_dir():
        return "is not a folder"
    if not any(folder.iterdir()):
        return ""
    try:
        meta = read_meta(str(folder))
    except (FileNotFoundError, ValueError):
        return f"is not a shard folder: it has no {META}/ that {Path(__file__).name} wrote"
    try:
        for name in sorted(p.name for p in folder.iterdir()):
            if name not in (META, *meta["splits"]):
                return f"holds {folder / name}, which {Path(__file__).name} does not write"
            chunks, _ = read_index(str(folder / name))
            known = {INDEX, *(chunk for chunk, _, _ in chunks)}
            other = sorted(p.name for p in (folder / name).iterdir() if p.name not in known)
            if other:
                return f"holds {folder / name / other[0]}, which is not in its {INDEX}"
    except ValueError as e:  # read_index: a split without its index
        return f"is not a shard folder ({e})"
    return ""


def exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (Linux's renameat2 with RENAME_EXCHANGE): ``b`` holds the one or the
    other at every moment. False where the system or its file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    cwd, swap = -100, 2  # AT_FDCWD, RENAME_EXCHANGE (linux/fcntl.h, linux/fs.h)
    if renameat2(cwd, os.fsencode(a), cwd, os.fsencode(b), swap) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def check_overwrite(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out} exists; pass --overwrite to replace it")
    problem = shard_folder_problem(out) if out.exists() else ""
    if problem:
        raise ConfigError(
            f"--out {out} {problem}: --overwrite replaces only the shard folder of an earlier conversion; "
            "choose another --out"
        )


class Job:
    """The work folder of a conversion to ``out``: ``.<name>.partial/`` beside it, with job.json (what is
    converted, how: chunk size and writer processes, and the splits done with what they hold) and the splits'
    folders as they are written."""

    def __init__(self, out: Path, inputs: dict, chunk_bytes: str, workers: int):
        self.folder = out.parent / f".{out.name}.partial"
        self.file = self.folder / "job.json"
        self.inputs = json.loads(json.dumps(inputs, sort_keys=True, default=str))
        self.chunk_bytes, self.workers = chunk_bytes, workers
        self.done: dict[str, dict] = {}

    def start(self) -> None:
        """Go on with the work folder of the same conversion, or start a new one (another's is discarded);
        a conversion still running into it is refused."""
        try:
            job = json.loads(self.file.read_text())
        except (OSError, ValueError):
            job = None
        writer = str((job or {}).get("writer", ""))
        if writer != writer_id() and writer_running(writer):
            raise ConfigError(f"{self.folder} is being written by {job['writer']}: wait for it, or stop it")
        if job is not None and job.get("inputs") == self.inputs:
            self.done = job.get("done", {})
            how = (job.get("chunk_bytes", self.chunk_bytes), job.get("workers", self.workers))
            if how != (self.chunk_bytes, self.workers):  # litdata goes on with the slices it started with
                print(f"[make_shards] --chunk-bytes {how[0]} --workers {how[1]} as the stopped conversion",
                      flush=True)  # fmt: skip
                self.chunk_bytes, self.workers = how
            print(f"[make_shards] going on with the stopped conversion in {self.folder} (splits done: "
                  f"{', '.join(self.done) or 'none'})", flush=True)  # fmt: skip
        elif self.folder.exists():
            print(f"[make_shards] {self.folder} was made for other inputs: discarded", flush=True)
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.save()

    def save(self) -> None:
        job = {"inputs": self.inputs, "chunk_bytes": self.chunk_bytes, "workers": self.workers,
               "done": self.done, "writer": writer_id()}  # fmt: skip
        atomic_write_text(self.file, json.dumps(job, indent=1))

    def finish(self, out: Path, overwrite: bool) -> None:
        check_overwrite(out, overwrite)  # as at the start: what is there may have changed meanwhile
        self.file.unlink()
        if overwrite and out.exists():
            for file in self.folder.rglob("*"):
                if file.is_file():
                    with open(file, "rb") as f:
                        os.fsync(f.fileno())
            if exchange(self.folder, out):
                shutil.rmtree(self.folder)  # the old shards now
                return
        publish_dir(self.folder, out, overwrite)


def write_shards(datamodule, section: dict, job: Job) -> dict:
    """Every split of ``datamodule`` under the job's folder (train/, val/, test/) and meta/, the splits done
    already skipped; returns the meta."""
    splits, controls, tops, folder = {}, [], [], job.folder
    for split, dataset in datamodule.datasets.items():
        if split == "predict":  # generation inputs, not data
            continue
        if split not in job.done:
            start = time.perf_counter()
            controls, top = write_split(dataset, folder / split, job.chunk_bytes, job.workers)
            job.done[split] = {"samples": len(dataset), "controls": controls, "max_segment_id": top}
            job.save()
            seconds = time.perf_counter() - start
            print(f"[make_shards] {split}: {len(dataset)} samples in {seconds:.1f} s", flush=True)
        controls, top = job.done[split]["controls"], job.done[split]["max_segment_id"]
        tops += [] if top is None else [top]
        splits[split] = len(dataset)
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
    # what each split's reader checks it against (datamodules/shards.py: check_split)
    meta["indexes"] = {split: read_index(str(folder / split))[1] for split in splits}
    text = json.dumps(meta, default=str)
    if (folder / META).exists():
        shutil.rmtree(folder / META)
    isolated(optimize_meta, text, folder / META)
    return meta


def _stop(signum, frame):
    raise SystemExit(128 + signum)


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
        check_overwrite(out, args.overwrite)
        datamodule, section, changed = build_data(Path(args.config), args.overrides, args.resolution, out)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"make_shards: {e}", file=sys.stderr)
        return 2
    if changed:
        print(f"[make_shards] train samples written as val samples: {', '.join(changed)} "
              "(data=shards flips when it reads: data.flip)", flush=True)  # fmt: skip
    start = time.perf_counter()
    job = Job(out, {"source": section, "resolution": datamodule.resolution}, args.chunk_bytes, args.workers)
    previous = signal.signal(signal.SIGTERM, _stop)  # a clean stop, as Ctrl-C's: the work folder is kept
    try:
        job.start()
        meta = write_shards(datamodule, section, job)
        job.finish(out, args.overwrite)
    except ConfigError as e:
        print(f"make_shards: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit, RuntimeError) as e:
        code = e.code if isinstance(e, SystemExit) else 130 if isinstance(e, KeyboardInterrupt) else 1
        what = f"failed: {e}" if isinstance(e, RuntimeError) else "stopped"
        print(f"make_shards: {what}\nmake_shards: what was written is kept in {job.folder}: the same command "
              "goes on from there", file=sys.stderr)  # fmt: skip
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
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
