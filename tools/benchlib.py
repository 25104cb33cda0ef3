"""What the ``tools/bench*.py`` scripts share: the machine's name, a timer, the peak memory of one call, and
the official VAR code built on varctl's weights.

Peak memory on the CPU is the process's resident size sampled every millisecond during the call, minus its
size before the call. glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, which
would hide later calls' peaks, so ``PeakMemory`` first fixes the threshold at 64 KiB (every tensor of that
size or more is mapped and returned on free) and trims the heap before each call: measure memory after the
timing, which wants the opposite (``steady_allocator``). On CUDA it is ``torch.cuda.max_memory_allocated``
over the call.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6") if Path("/proc/self/statm").exists() else None
    except OSError:  # not glibc
        return None


def steady_allocator() -> None:
    """Fix glibc's allocator in the steady state a long run reaches, before timing. Its mmap threshold starts
    at 128 KiB and rises as mapped blocks are freed, so whichever code runs first in a process pays page
    faults for fresh mappings that the code run after it does not (seen: the same training step 25 % slower
    when run first). At the threshold's ceiling (32 MiB) and without trimming, both codes reuse the heap."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)


def interleaved(names: list[str], repeats: int) -> list[list[str]]:
    """The order of each round: ABBA..., so neither code always runs right after the other."""
    return [names if r % 2 == 0 else names[::-1] for r in range(repeats)]


def interleaved_times(calls: dict, repeats: int, device: str = "cpu") -> dict[str, list[float]]:
    """Seconds of each of ``calls`` (name -> function) in each round: one warm-up each, then ``repeats``
    rounds in the order of ``interleaved`` (``timed``: a CUDA device is synchronised before each clock
    stops)."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for order in interleaved(list(calls), repeats):
        for name in order:
            times[name].append(timed(calls[name], device)[0])
    return times


def interleaved_medians(calls: dict, repeats: int, device: str = "cpu") -> dict[str, float]:
    """Median seconds of each of ``calls``, timed as ``interleaved_times`` does."""
    return {k: statistics.median(v) for k, v in interleaved_times(calls, repeats, device).items()}


def paired_speedup(base: list[float], other: list[float]) -> float:
    """How many times faster the code timed ``base`` is than the one timed ``other``, by the median over the
    rounds of other / base. Each round runs both codes back to back (``interleaved``), so a machine whose
    speed drifts between rounds (a shared VM: the same step 13.8-19 s) moves both times of a round together;
    the ratio of the two medians can take them from different rounds."""
    return statistics.median(round_ratios(base, other))


def round_ratios(base: list[float], other: list[float]) -> list[float]:
    """other / base in each round (one time of each code per round)."""
    if len(base) != len(other) or not base:
        raise ValueError(f"one time of each code per round expected, found {len(base)} and {len(other)}")
    return [o / b for b, o in zip(base, other)]


def add_pooling(parser) -> None:
    """``--processes N`` (measure in N fresh processes: ``in_processes``) and the children's ``--json``."""
    pool = "measure in this many fresh processes, one after the other, and pool their rounds"
    parser.add_argument("--processes", type=int, default=1, help=pool)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # a child of --processes


def median_interval(
    groups: list[list[float]], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(median, low, high): the median of all the values of ``groups`` (each group one process's rounds) and
    a ``level`` bootstrap interval of it that resamples the groups, then the values within each: rounds of
    one process share that process's bias (a machine whose speed, or a process whose memory layout, favours
    one code for a while), so the groups, not the rounds, are the independent draws."""
    groups = [list(g) for g in groups if len(g)]
    if not groups:
        raise ValueError("median_interval needs at least one value")
    gen = torch.Generator().manual_seed(seed)
    medians = []
    for _ in range(resamples):
        pick = torch.randint(len(groups), (len(groups),), generator=gen).tolist()
        values = []
        for g in pick:
            rows = torch.randint(len(groups[g]), (len(groups[g]),), generator=gen).tolist()
            values += [groups[g][r] for r in rows]
        medians.append(statistics.median(values))
    medians.sort()
    tail = (1 - level) / 2
    low = medians[int(tail * (resamples - 1))]
    high = medians[int(round((1 - tail) * (resamples - 1)))]
    return statistics.median(v for g in groups for v in g), low, high


def in_processes(script: str, argv: list[str], processes: int) -> list[dict]:
    """Run ``script`` ``processes`` times, one after the other, each in a fresh interpreter with
    ``argv`` (``--processes`` left out) plus ``--json``, and return what each printed as JSON on its last
    line of output. A fresh process per measurement averages over what one process fixes for its whole
    life (where its tensors land in memory, which core its threads start on). Each child finds its index
    in the environment (``BENCH_PROCESS``: 0, 1, ...), to vary what it measures first."""
    child, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--processes":
            skip = True
        elif not a.startswith("--processes="):
            child.append(a)
    runs = []
    for i in range(processes):
        out = subprocess.run(
            [sys.executable, script, *child, "--json"],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "BENCH_PROCESS": str(i)},
        ).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(f"process {i + 1} of {processes} done", file=sys.stderr, flush=True)
    return runs


def ratio_interval(groups: list[list[float]]) -> str:
    """``median [low, high] (lowest-highest)``: the pooled median of each round's ratio, its 95 % interval
    (``median_interval``) and the range of the processes' own medians."""
    mid, low, high = median_interval(groups)
    own = [statistics.median(g) for g in groups]
    return f"{mid:.2f}x [{low:.2f}, {high:.2f}] ({min(own):.2f}-{max(own):.2f})"


def cpu_name() -> str:
    """The CPU's model name (``platform.processor()`` is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def timed(fn, device: str = "cpu"):
    """(seconds, result) of ``fn()``; on CUDA the device is synchronised before the clock stops."""
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak``: the bytes the block added at its peak."""

    def __init__(self, device: str = "cpu", interval: float = 1e-3):
        self.device, self.interval, self.peak = device, interval, 0
        self._libc = None if device.startswith("cuda") else _glibc()

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        if self._libc is not None:
            self._libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
            self._libc.malloc_trim(0)
        self._base = self._max = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self._max, _rss()) - self._base


def load_official(git_dir: str, tmp: str, vae, var):
    """Build the official VQVAE and VAR from the git dir and load varctl's weights into them strictly."""
    archive = subprocess.run(
        ["git", "-C", git_dir, "archive", "HEAD"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
    try:
        importlib.import_module("huggingface_hub")
    except ImportError:  # the official VAR file imports it for VARHF only
        stub = types.ModuleType("huggingface_hub")
        stub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = stub
    sys.path.insert(0, tmp)
    from models.var import VAR as OfficialVAR  # noqa: E402  (from the exported tree)
    from models.vqvae import VQVAE as OfficialVQVAE  # noqa: E402

    vc, c = vae.config, var.config
    with contextlib.redirect_stdout(io.StringIO()):  # the constructors print their settings
        off_vae = OfficialVQVAE(
            vocab_size=vc.vocab_size,
            z_channels=vc.z_channels,
            ch=vc.ch,
            test_mode=True,
            share_quant_resi=vc.share_quant_resi,
            v_patch_nums=vc.patch_nums,
        )
        off_var = OfficialVAR(
            vae_local=off_vae,
            num_classes=c.num_classes,
            depth=c.depth,
            embed_dim=c.C,
            num_heads=c.heads,
            drop_path_rate=c.drop_path,
            norm_eps=c.norm_eps,
            shared_aln=c.shared_aln,
            cond_drop_rate=c.cond_drop_rate,
            attn_l2_norm=c.attn_l2_norm,
            patch_nums=c.patch_nums,
            flash_if_available=False,
            fused_if_available=False,
        )
    off_vae.load_state_dict(vae.state_dict(), strict=True)
    off_var.load_state_dict(var.state_dict(), strict=True)
    return off_var.eval()
