"""Shared pieces of the memory and speed benchmarks: models, episodes, memory windows.

Both benchmarks run on random GPT-2-shaped models (no download) and on episodes of
random token ids of exactly `seq_len` tokens (no padding), so every configuration sees
the same amount of work. Memory is measured in a child process per configuration:

- CUDA: `torch.cuda.max_memory_allocated` minus `memory_allocated` after the model,
  LoRA and episode are in place (`reset_peak_memory_stats` at the start of the window);
- CPU: peak resident set size of the child minus its resident size after the model is
  loaded. Freed heap is handed back first (`malloc_trim`), the kernel's high-water mark
  is reset (`/proc/self/clear_refs` = 5) and read from `VmHWM`, and a thread samples
  RSS as a cross-check (every millisecond where VmHWM cannot be reset); the larger counts.
  The child fixes glibc's mmap threshold at 64 KiB first (`mallopt`): by default glibc
  raises it (up to 32 MiB) each time a large block is freed, after which freed tensors
  stay in the heap and count as resident, so the peak would depend on the order of
  earlier allocations (measured: the same `full` meta-gradient at 100 to 113 MiB for
  K = 1 to 4, and at 60 MiB for both with the fixed threshold). With it, RSS follows
  the tensors alive, as CUDA's allocator statistics do.

CPU threads: `--threads` (default 1). On a shared machine, more OpenMP threads than free
cores stall at every barrier (2-30x slower per operation, measured on a loaded 2-core
machine); on a dedicated machine raise it to the core count.

Used by `benchmarks/memory.py` and `benchmarks/speed.py`; not a public API.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from utils import MemoryWindow, atomic_write_json, resident_memory_bytes  # noqa: E402, F401
from utils import fix_mmap_threshold as _fix_mmap_threshold  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# GPT-2 shapes (GPT2Config keyword overrides). gpt2-small is GPT2Config() itself: 124M
# parameters, the shape of the `gpt2` checkpoint. gpt2-mini keeps GPT-2's vocabulary and
# cuts depth and width so that timing runs fit a CPU; tiny is model.py's test size.
SHAPES = {
    "tiny": dict(n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=30522),
    "gpt2-mini": dict(n_embd=256, n_layer=4, n_head=4),
    "gpt2-small": dict(),
}
# Today's decoders (model.tiny_decoder_config keyword overrides, family first), built from
# the config alone: qwen2.5-0.5b is Qwen/Qwen2.5-0.5B's config.json (494M parameters,
# embeddings tied; grouped-query attention, 14 query / 2 key-value heads).
DECODER_SHAPES = {
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                                   intermediate_size=4864, max_position_embeddings=32768,
                                   rope_theta=1000000.0, tie_word_embeddings=True)),
    "llama-tiny": ("llama", dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 intermediate_size=128)),
}


# ------------------------------------------------------------------------------------
# Run description
# ------------------------------------------------------------------------------------

def hardware(device: torch.device) -> dict:
    """Machine, library versions and date, for the JSON and the printed header."""
    import transformers
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device), "cpu": _cpu_model(), "cpu_cores": os.cpu_count(),
            "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the OS has none): timing context."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def header(title: str, hw: dict) -> str:
    """A markdown header line block naming the machine and date."""
    gpu = f", GPU {hw['gpu']} (CUDA {hw['cuda']})" if "gpu" in hw else ""
    return (f"## {title}\n\n{hw['date']} | device {hw['device']}{gpu} | CPU {hw['cpu']}, "
            f"{hw['cpu_cores_usable']} of {hw['cpu_cores']} cores usable, {hw['torch_threads']} "
            f"torch threads | torch {hw['torch']}, transformers {hw['transformers']}, "
            f"Python {hw['python']}")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def resolve(device: str) -> torch.device:
    """`auto` -> cuda when available; `cuda` on a machine without one is an error."""
    from utils import resolve_device
    return resolve_device(device)


# ------------------------------------------------------------------------------------
# Model and episodes
# ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """What every configuration of a benchmark run shares."""
    model_shape: str
    n_way: int
    k_shot: int
    q_query: int
    seq_len: int
    device: str
    seed: int = 0


def build_model(setting: Setting, lora: bool):
    """A random GPT-2 of `setting.model_shape` with an N-way head, in train mode.

    With `lora`, LoRA is injected as config.yml's `lora` section says for GPT-2 (rank,
    alpha, dropout, target modules) and only LoRA + head train; without, every weight
    trains (the full-parameter MAML/FOMAML baselines).

    Returns:
        (model on the device, theta: the tensors meta-learned).
    """
    from transformers import GPT2Config, GPT2Model
    import model as M
    from config import load_config
    if setting.model_shape in DECODER_SHAPES:
        family, sizes = DECODER_SHAPES[setting.model_shape]
        config, cls = M.tiny_decoder_config(family, sizes["vocab_size"], **sizes)
    elif setting.model_shape in SHAPES:
        family, config, cls = "gpt2", GPT2Config(**SHAPES[setting.model_shape]), GPT2Model
    else:
        raise ValueError(f"--model-shape must be one of {', '.join([*SHAPES, *DECODER_SHAPES])}, "
                         f"got {setting.model_shape!r}")
    config.use_cache = False  # as model.load_model: recomputation must not see a KV cache
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(setting.seed)
        backbone = cls(config)
        net = M.MELoRAModel(backbone, family, setting.n_way, pooling="last")
        if lora:
            cfg = load_config().lora
            M.inject_lora(net, cfg.default_rank, cfg.alpha, cfg.dropout, cfg.target_modules[family])
    net = net.to(torch.device(setting.device)).train()
    theta = M.lora_parameters(net) if lora else dict(net.named_parameters())
    return net, theta


def make_episode(setting: Setting, index: int = 0, vocab_size: int | None = None):
    """An N-way K-shot episode of random token ids, every example `seq_len` tokens.

    Returns:
        A `dataset_loader.Episode` on the device (labels shuffled per set).
    """
    from dataset_loader import Episode
    vocab = vocab_size or _vocab_size(setting.model_shape)
    gen = torch.Generator().manual_seed(setting.seed * 1_000_003 + index)

    def part(per_class: int) -> dict:
        n = setting.n_way * per_class
        labels = torch.arange(setting.n_way).repeat(per_class)[torch.randperm(n, generator=gen)]
        return {"input_ids": torch.randint(0, vocab, (n, setting.seq_len), generator=gen).to(setting.device),
                "attention_mask": torch.ones(n, setting.seq_len, dtype=torch.long, device=setting.device),
                "labels": labels.to(setting.device)}
    return Episode(part(setting.k_shot), part(setting.q_query), setting.n_way,
                   [f"class_{c}" for c in range(setting.n_way)], "random-token-ids")


def _vocab_size(shape: str) -> int:
    """Vocabulary size of a shape (GPT2Config's default where the shape keeps it)."""
    from transformers import GPT2Config
    if shape in DECODER_SHAPES:
        return DECODER_SHAPES[shape][1]["vocab_size"]
    return SHAPES[shape].get("vocab_size", GPT2Config().vocab_size)


def inner_lr() -> float:
    """The inner rate a of config.yml (meta_learning.inner.default_lr)."""
    from config import load_config
    return load_config().meta_learning.inner.default_lr


# ------------------------------------------------------------------------------------
# Memory windows (the window itself is utils.MemoryWindow, shared with evaluation.py)
# ------------------------------------------------------------------------------------

def memory_method(device: torch.device) -> str:
    """How the benchmarks' memory figures are measured (recorded in the JSON)."""
    if device.type == "cuda":
        return "cuda: max_memory_allocated in the window minus memory_allocated after model load"
    return ("cpu: peak RSS of the configuration's child process (VmHWM after clear_refs, "
            "cross-checked by psutil sampling) minus its RSS after model load and malloc_trim; "
            "glibc mmap threshold fixed at 64 KiB so that freed tensors leave RSS")


# ------------------------------------------------------------------------------------
# One meta-gradient in a child process
# ------------------------------------------------------------------------------------

KINDS = ("idle", "maml", "fomaml", "melora", "unrolled_lora")


def measure(job: dict) -> dict:
    """Extra peak memory and seconds of one meta-gradient; meant for `run_in_child`.

    Args:
        job: `setting` (a `Setting` as a dict), `kind`, `method` (MELoRA's Hessian
            method), `checkpointing`, `micro_batch`, `inner_steps`, `threads`, and
            optionally `keep_last_step`, `keep_graphs` (trainer.HessianOptions). Kinds:
            idle (load, then nothing: the floor), maml / fomaml (every weight,
            baseline.MAML), melora (trainer.compute_meta_gradient over LoRA + head),
            unrolled_lora (second-order MAML over the same LoRA + head tensors by
            unrolled autograd, baseline.MAML on the LoRA model).

    Returns:
        The job with `extra_mb`, `sampled_mb`, `base_mb`, `seconds`, `query_loss`.
    """
    import model as M
    fixed_mmap = _fix_mmap_threshold()
    set_threads(job["threads"])
    setting = Setting(**job["setting"])
    device = torch.device(setting.device)
    net, theta = build_model(setting, lora=job["kind"] != "maml" and job["kind"] != "fomaml")
    if job.get("base_dtype", "fp32") != "fp32":  # MELoRA: the frozen base; MAML: every weight
        dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[job["base_dtype"]])
        if job["kind"] in ("maml", "fomaml"):
            net = net.to(dtype)
            theta = dict(net.named_parameters())
        else:
            M.cast_frozen_base(net, dtype)
    if job.get("checkpointing"):
        M.enable_checkpointing(net, lora_only=True)
    episode = make_episode(setting)
    work = _work(job, net, theta, episode)
    with torch.no_grad():  # warm-up: lazy library state is not the method's memory
        M.forward(net, theta, {k: v[:1] for k, v in episode.support.items()})
    window = MemoryWindow(device)
    with window:
        start = time.perf_counter()
        loss = work()
        seconds = time.perf_counter() - start
    return {**job, "extra_mb": window.extra_mb, "sampled_mb": window.sampled_mb,
            "base_mb": window.base_mb, "seconds": seconds, "query_loss": loss,
            "fixed_mmap_threshold": fixed_mmap, "weights_mb": M.weights_mb(net),
            "estimate_mb": estimate_mb(job, net) if job["kind"] == "melora" else None}


def estimate_mb(job: dict, net) -> float:
    """model.estimate_peak_activation_mb for a MELoRA job (what keep_graphs/checkpointing
    `auto` decide on), from a config with the job's episode, method and schedule."""
    import model as M
    from config import load_config
    s = Setting(**job["setting"])
    cfg = load_config(overrides=[
        f"tasks.n_way={s.n_way}", f"tasks.k_shot={s.k_shot}", f"tasks.q_query={s.q_query}",
        f"models.max_length={s.seq_len}", f"meta_learning.inner.default_num_steps={job['inner_steps']}",
        f"memory_optimization.hessian_approximation.method={job['method']}",
        f"memory_optimization.gradient_accumulation.default_micro_batch={job['micro_batch']}",
        f"training.precision={job.get('base_dtype', 'fp32')}"])
    return M.estimate_peak_activation_mb(cfg, net, keep_graphs=job.get("keep_graphs", 0))


def _work(job: dict, net, theta, episode) -> Callable[[], float]:
    """A closure computing the job's meta-gradient and returning its query loss."""
    import baseline as B
    from trainer import HessianOptions, compute_meta_gradient
    lr, steps, kind = inner_lr(), job["inner_steps"], job["kind"]
    if kind not in KINDS:
        raise ValueError(f"job kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "idle":
        return lambda: time.sleep(0.2) or float("nan")
    if kind in ("maml", "fomaml", "unrolled_lora"):
        method = B.MAML(net, theta, lr, steps, outer_lr=0.0, grad_clip=0.0,
                        first_order=kind == "fomaml", head_init="zero")
        return lambda: method.meta_gradient([episode])[0]
    support, query = episode.support, episode.query
    hessian = HessianOptions(keep_last_step=job.get("keep_last_step", False),
                             keep_graphs=job.get("keep_graphs", 0))
    return lambda: float(compute_meta_gradient(net, theta, support, query, lr, steps,
                                               job["method"], job["micro_batch"],
                                               hessian=hessian, seed=0, head_init="zero")[0])


# ------------------------------------------------------------------------------------
# Child processes and timing
# ------------------------------------------------------------------------------------

def run_in_child(fn: Callable[[dict], dict], job: dict) -> dict:
    """`fn(job)` in a fresh process (forkserver: torch is imported once, the model is
    built anew in every child).

    Returns:
        fn's result; for a child killed by SIGKILL (the kernel's out-of-memory killer),
        the job with `error` set, so the table shows the configuration as failed.

    Raises:
        RuntimeError: `fn` raised in the child (its traceback is in the message), or
            the child died another way.
    """
    ctx = _context()
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main, args=(fn, job, send), daemon=True)
    child.start()
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:
        status, payload = None, None
    child.join()
    if status == "ok":
        return payload
    if status == "error":
        raise RuntimeError(f"benchmark configuration {_describe(job)} failed in its child process:\n{payload}")
    if child.exitcode == -signal.SIGKILL:
        return {**job, "error": "child process killed (SIGKILL: out of memory?)"}
    raise RuntimeError(f"benchmark configuration {_describe(job)}: child process exited with "
                       f"code {child.exitcode} without a result")


def _child_main(fn, job, send) -> None:
    try:
        send.send(("ok", fn(job)))
    except BaseException:  # noqa: BLE001  (handed to the parent, which raises it)
        send.send(("error", traceback.format_exc()))
    finally:
        send.close()


def _describe(job: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in job.items() if k != "setting")


_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        import multiprocessing
        methods = multiprocessing.get_all_start_methods()
        _CTX = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            _CTX.set_forkserver_preload(["torch", "transformers.models.gpt2.modeling_gpt2"])
    return _CTX


def set_threads(threads: int) -> None:
    """torch's intra-op CPU threads; 0 keeps torch's default (one per core)."""
    if threads > 0:
        torch.set_num_threads(threads)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of `fn()`, CUDA work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def episode_parser(description: str, model_shape: str, inner_steps: int,
                   inner_help: str) -> argparse.ArgumentParser:
    """The arguments every synthetic-episode benchmark shares: device, model shape, N-way
    K-shot with Q queries, tokens per example, K."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--model-shape", default=model_shape, choices=[*SHAPES, *DECODER_SHAPES],
                        help="random GPT-2 shape (gpt2-small = GPT2Config(), 124M parameters), or a "
                             "decoder's (qwen2.5-0.5b: Qwen2.5-0.5B's config, 494M)")
    parser.add_argument("--n-way", type=int, default=5)
    parser.add_argument("--k-shot", type=int, default=1)
    parser.add_argument("--q-query", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per example")
    parser.add_argument("--inner-steps", type=int, default=inner_steps, help=inner_help)
    return parser


def describe_setting(s: dict, p: dict) -> str:
    """The model and episode of a synthetic-episode benchmark, as the tables' first sentence."""
    kind = DECODER_SHAPES[s["model_shape"]][0] if s["model_shape"] in DECODER_SHAPES else "GPT-2"
    return (f"Model: random {kind}, shape `{s['model_shape']}` ({p['model'] / 1e6:.1f}M parameters; "
            f"MELoRA theta = LoRA + head, {p['melora_theta'] / 1e6:.2f}M). Episode: "
            f"{s['n_way']}-way {s['k_shot']}-shot, {s['q_query']} queries per class, "
            f"{s['seq_len']} tokens per example.")


def parse_methods(text: str) -> list[str]:
    """`--methods full,none` -> ["full", "none"], checked against trainer's methods."""
    from trainer import HESSIAN_METHODS
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in HESSIAN_METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown Hessian methods {bad}; choose from "
                                         f"{', '.join(HESSIAN_METHODS)}")
    return methods


def parse_ints(text: str) -> list[int]:
    """`1,2,4` -> [1, 2, 4]; "" -> []."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def fmt(x: float | None, digits: int = 1) -> str:
    """A table cell: a number, or '-' for missing."""
    if x is None or x != x:
        return "-"
    return f"{x:,.{digits}f}"


def run_benchmark(args, run: Callable, tables: Callable[[dict], str]) -> dict:
    """Run a benchmark with `args`, write its JSON atomically, print its tables."""
    set_threads(args.threads)
    started = time.perf_counter()
    result = run(args)
    result["wall_seconds"] = time.perf_counter() - started
    atomic_write_json(args.output, result)
    print(tables(result))
    print(f"\nwrote {args.output} ({result['wall_seconds']:.0f} s)")
    return result
