"""Plumbing every module may use: errors, seeding, devices, atomic file writes, logging,
torchrun helpers and memory meters. It imports nothing of the project and owns no other
module's concept: the config lives in `config`, run folders and checkpoints in `runs`, the
metrics sink in `metrics`, each enum and registry in the module that uses it.

    set_seed(0)
    device = resolve_device("auto")
    atomic_write_json("run/results.json", {"accuracy": 0.5})
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import random
import re
import resource
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

log = logging.getLogger("melora")


class UserError(Exception):
    """A problem with the user's input; `main` prints it as one paragraph and exits 2."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value, named by its dotted key."""


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training after a checkpoint; `main` exits 128 + signum.

    A KeyboardInterrupt, so no `except Exception` on the way up swallows it.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# ------------------------------------------------------------------------------------
# Seeding, devices, memory
# ------------------------------------------------------------------------------------

def episode_seed(seed: int, index: int) -> int:
    """The seed set before adapting on episode `index` (dropout masks paired across methods,
    trials and seeds): ``seed + 7919 * (index + 1)``."""
    return seed + 7919 * (index + 1)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(spec: str) -> torch.device:
    """`auto` -> cuda if available else cpu; otherwise the named device, checked.

    Raises:
        UserError: a CUDA device was asked for on a machine without one.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise UserError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from e
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {spec!r}: MELoRA trains on cpu, cuda or mps, not "
                        f"{device.type}; use --device auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec!r} asks for CUDA but this machine has no CUDA GPU "
                        "(or torch is a CPU build); use --device cpu")
    if device.type == "cuda" and device.index is not None and \
            device.index >= torch.cuda.device_count():
        raise UserError(f"--device {spec!r}: this machine has {torch.cuda.device_count()} CUDA "
                        f"GPU(s), numbered from 0; use --device cuda:0 .. "
                        f"cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {spec!r} asks for Apple's MPS, which this machine or torch "
                        "build lacks; use --device cpu (or cuda on a CUDA machine)")
    return device


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on CUDA (CPU peaks are per process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: `torch.cuda.max_memory_allocated` on CUDA, else the peak
    resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20


def resident_memory_bytes() -> int:
    """This process's resident set size now (psutil)."""
    import psutil
    return psutil.Process().memory_info().rss


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_processes() -> int:
    """Processes of this run working at once on this machine: torchrun's ranks here, or 1."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def thread_budget(processes: int | None = None) -> int:
    """Torch threads for each of `processes` processes sharing this machine's cores.

    `OMP_NUM_THREADS`, when set, wins (the user's choice); otherwise cores / processes,
    at least 1, so parallel processes split the cores instead of oversubscribing them
    (on a busy 2-core machine, oversubscribed OpenMP threads made a run 30x slower).

    Args:
        processes: processes working at once (default: `local_processes()`).
    """
    chosen = os.environ.get("OMP_NUM_THREADS", "")
    if chosen.isdigit() and int(chosen) > 0:
        return int(chosen)
    return max(1, cpu_cores() // (processes or local_processes()))


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch dict with every tensor moved to `device`."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def json_default(obj: Any) -> Any:
    """`json.dumps`'s `default` for NumPy numbers and arrays, tensors and paths."""
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


# ------------------------------------------------------------------------------------
# Logging
# ------------------------------------------------------------------------------------

def setup_logging(level: int = logging.INFO, log_file: str | os.PathLike | None = None) -> None:
    """Log `melora.*` messages to stderr (and to `log_file` when given).

    Under torchrun, ranks other than 0 log warnings and errors only, to stderr, so the
    run's log file has one writer.
    """
    if not is_main_process():
        level, log_file = max(level, logging.WARNING), None
    log.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(fmt)
        log.addHandler(handler)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.propagate = False


# Environment that silences third-party progress bars and info logs (read at import,
# and inherited by spawned child processes): transformers' "Loading weights" bars,
# datasets' "Generating train split" bars, hub download bars.
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
_QUIETED: set[str] = set()  # the QUIET_ENV keys quiet_third_party set


def quiet_third_party(verbose: bool = False) -> None:
    """Hide transformers/datasets/hub progress bars and info logs unless `verbose`.

    Sets `QUIET_ENV` (a variable the user set keeps its value), so child processes
    inherit it, and applies it to those libraries when they are already imported. Our
    own tqdm bars (meta-train, evaluation, fidelity) are not affected.
    """
    if verbose:
        for key in _QUIETED:  # only what an earlier call set, never the user's choice
            os.environ.pop(key, None)
        _QUIETED.clear()
    else:
        for key, value in QUIET_ENV.items():
            if key not in os.environ:
                os.environ[key] = value
                _QUIETED.add(key)
    transformers, datasets = sys.modules.get("transformers"), sys.modules.get("datasets")
    if transformers is not None:  # already imported: apply now (else QUIET_ENV does at import)
        logging_ = transformers.utils.logging
        (logging_.set_verbosity_warning if verbose else logging_.set_verbosity_error)()
        (logging_.enable_progress_bar if verbose else logging_.disable_progress_bar)()
    if datasets is not None:
        (datasets.utils.logging.set_verbosity_warning if verbose else datasets.utils.logging.set_verbosity_error)()
        (datasets.enable_progress_bars if verbose else datasets.disable_progress_bars)()


# ------------------------------------------------------------------------------------
# Distributed (torchrun)
# ------------------------------------------------------------------------------------
# `torchrun --nproc_per_node N main.py ...` sets RANK, LOCAL_RANK, WORLD_SIZE and the
# rendezvous variables (MASTER_ADDR, MASTER_PORT); without them every helper below
# describes one process and communicates nothing.

def init_distributed(device_spec: str) -> bool:
    """Join torchrun's process group (env:// rendezvous) when there is more than one process.

    NCCL when this rank runs on CUDA (device cuda:LOCAL_RANK), gloo on CPU. Calling it
    again, or in a single process, does nothing.

    Args:
        device_spec: `training.device` (auto, cpu, cuda, cuda:N).

    Returns:
        Whether more than one process takes part.
    """
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        device = rank_device(resolve_device(device_spec))
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL binds each rank to its own GPU
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def close_distributed(orderly: bool = True) -> None:
    """Leave the process group, if this process joined one.

    `orderly` (the mode returned on this rank, as it does on every rank): a barrier
    first, so no rank tears down its gloo or NCCL threads while a peer is still inside a
    collective with it (a rank that destroyed its group early could abort with
    "terminate called without an active exception", or fail its peer's last collective),
    then destroy. Otherwise (an error, a signal, a lost peer) no barrier, which could wait
    for a rank that is gone: destroy only.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    if orderly and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def lost_peer(error: BaseException) -> str | None:
    """The one-line reason to print when a collective failed because a peer rank is gone
    (killed, crashed, or stopped by torchrun after another rank failed); None when
    `error` is not such a failure or no process group is up."""
    dist = _dist()
    if dist is None or dist.get_world_size() <= 1 or not isinstance(error, RuntimeError):
        return None
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if len(first) > 160:
        first = first[:first.rfind(" ", 0, 160)] + " ..."
    return (f"rank {dist.get_rank()} of {dist.get_world_size()} stopped: a collective with the other "
            f"ranks failed ({first}); another rank stopped or was killed, and its own message (or "
            "torchrun's report) says why. Continue from the last checkpoint with --resume")


def world_size() -> int:
    """Processes taking part (1 without torchrun)."""
    return _dist().get_world_size() if _dist() else 1


def rank() -> int:
    """This process's rank, 0 .. world_size() - 1 (0 without torchrun)."""
    return _dist().get_rank() if _dist() else 0


def is_main_process() -> bool:
    """Rank 0: the one process that logs metrics, shows progress and writes files."""
    return rank() == 0


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun, CUDA means this rank's GPU, cuda:LOCAL_RANK; other devices pass."""
    if device.type != "cuda" or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.index is not None and device.index != local:
        warnings.warn(f"training.device={device} is ignored under torchrun: each process uses "
                      f"the GPU of its LOCAL_RANK (this one cuda:{local})", UserWarning, stacklevel=2)
    return torch.device("cuda", local)


def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The element-wise sums over ranks of `tensors` (one dtype), in one flat message.

    Every rank receives the same sums; one process gets its tensors back unchanged.
    """
    if not _dist() or not tensors:
        return list(tensors)
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])  # (sum of numels,)
    _dist().all_reduce(flat)
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def all_reduce_max(value: float, device: torch.device) -> float:
    """The largest `value` over ranks (e.g. peak memory)."""
    if not _dist():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    return float(t)


def gather_to_main(obj: Any) -> list | None:
    """Every rank's picklable `obj`, in rank order, on rank 0; None on the other ranks."""
    if not _dist():
        return [obj]
    out = [None] * world_size() if is_main_process() else None
    _dist().gather_object(obj, out, dst=0)
    return out


def run_on_main(fn, *args, **kwargs) -> Any:
    """`fn(*args, **kwargs)` on rank 0 only; every rank returns its result or raises its
    UserError, so a refusal (say, an existing run folder) stops all ranks together."""
    if not _dist():
        return fn(*args, **kwargs)
    outcome = [None]
    if is_main_process():
        try:
            outcome = [("ok", fn(*args, **kwargs))]
        except UserError as e:
            outcome = [("error", e)]
        except Exception as e:  # tell the other ranks before failing, so none waits forever
            _dist().broadcast_object_list([("crash", f"{type(e).__name__}: {e}")], src=0)
            raise
    _dist().broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    if kind == "crash":
        raise RuntimeError(f"rank 0 failed ({value}); see its traceback")
    return value


def _dist():
    """`torch.distributed` when a process group is up, else None."""
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None

# ------------------------------------------------------------------------------------
# Memory windows (benchmarks/ and evaluation.py measure with the same instrument)
# ------------------------------------------------------------------------------------

SAMPLE_SECONDS = 0.001  # RSS sampling period of the CPU memory window without VmHWM
CROSS_CHECK_SECONDS = 0.02  # the same with VmHWM: a light cross-check (the sampler holds the GIL)


class MemoryWindow:
    """Extra peak memory (MiB) of the code inside `with`, over the memory at its start.

    Args:
        device: where the work runs.
        collect: run the garbage collector first, so the start counts live objects only
            (a large in-process heap, as under pytest, makes it slow).

    Attributes:
        extra_mb: peak inside the window minus the start (set on exit).
        base_mb: memory at the start (RSS on CPU, allocated on CUDA).
        sampled_mb: on CPU, the sampled peak minus the start (cross-check).

    Example:
        >>> with MemoryWindow(torch.device("cpu")) as window:
        ...     block = torch.ones(16, 2**20)  # 64 MiB
        >>> window.extra_mb > 32
        True
    """

    def __init__(self, device: torch.device, collect: bool = True):
        self.device, self.collect = device, collect
        self.extra_mb = self.base_mb = self.sampled_mb = float("nan")

    def __enter__(self) -> "MemoryWindow":
        if self.collect:
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        _malloc_trim()
        self._hwm_reset = _reset_hwm()
        self.base_mb = resident_memory_bytes() / 2**20
        self._period = CROSS_CHECK_SECONDS if self._hwm_reset else SAMPLE_SECONDS
        self._peak, self._stop = resident_memory_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base_mb
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, resident_memory_bytes())
        self.sampled_mb = self._peak / 2**20 - self.base_mb
        hwm = _hwm() if self._hwm_reset else 0
        self.extra_mb = max(self._peak, hwm) / 2**20 - self.base_mb

    def _sample(self) -> None:
        while not self._stop.wait(self._period):
            self._peak = max(self._peak, resident_memory_bytes())


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm() -> int:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


MMAP_THRESHOLD = 64 * 1024
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def fix_mmap_threshold() -> bool:
    """Serve every allocation of MMAP_THRESHOLD bytes or more from its own mapping,
    returned to the OS when freed (glibc only; returns False elsewhere).

    By default glibc raises the threshold (up to 32 MiB) each time a large block is
    freed, after which freed tensors stay in the heap and count as resident, so a peak
    would depend on the order of earlier allocations. Call it first thing in a process
    that measures memory (benchmark and evaluation children do)."""
    with contextlib.suppress(OSError, AttributeError):
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return False


def _malloc_trim() -> None:
    """Give freed heap back to the OS, so the window's start counts memory in use only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
