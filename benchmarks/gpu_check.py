"""GPU check: every CUDA path of MELoRA in one command, pass/fail per check.

    python benchmarks/gpu_check.py                      # on one CUDA GPU (<= 5 minutes)
    python benchmarks/gpu_check.py --device cpu --quick # the same script on CPU (<= 2 minutes)
    python benchmarks/gpu_check.py --output out/gpu_check.json --checks decoder_bf16_base

Checks (one JSON entry each, status pass / fail / "skipped: no CUDA"):

1. autocast_bf16, autocast_fp16: the exact meta-gradient (`full`) under
   `torch.autocast` against fp32 on the same model and episode: cosine >= 0.999.
2. memory_table: extra peak memory (`torch.cuda.max_memory_allocated` in a window
   minus `memory_allocated` at its start) of one meta-gradient at GPT-2-small shape:
   full-weight MAML (second and first order), unrolled second-order MAML over LoRA,
   and MELoRA `full` (checkpointing off/on, every graph kept) and `none`. Pass: MELoRA
   `full` (checkpointing on) below both second-order references.
3. batched_tasks: a meta-batch's inner loops run together
   (`trainer.compute_batched_meta_gradient`) against one task after another: tasks
   per second, pass at >= 2x.
4. torchrun_nccl: `torchrun --standalone --nproc_per_node 1 main.py --device cuda`
   (NCCL process group) trains two iterations of a tiny model.
5. oom_retry: under `torch.cuda.set_per_process_memory_fraction` set between the
   peaks of micro-batch 1 and of the whole set, a training step with the whole set
   runs out of memory, halves the micro-batch (`memory_optimization.auto_micro_batch`)
   and finishes with a finite loss.
6. attention_kernels: the default (fused) scaled-dot-product attention kernel against
   the math kernel: logits and first-order meta-gradients agree (cosine >= 0.9999),
   and the time of each.
7. decoder_bf16_base: a random Llama-layout decoder built from its config (rotary
   positions, grouped-query attention; `--quick`: the test size) with its frozen base in
   bf16 (`model.cast_frozen_base`, as `training.precision=bf16` on CUDA) under bf16
   autocast, LoRA factors and head in fp32: the exact meta-gradient (`full`) against fp32
   on the same (bf16-rounded) weights, cosine >= 0.99; theta and the meta-gradient stay
   fp32; and the weights' memory and the meta-gradient's extra peak memory and time of
   both.

On CPU the checks whose criterion is about CUDA are "skipped: no CUDA"; those that can
still run their code (1-3, 6, 7) do so on a tiny model (`cpu_smoke`), so the script is
known to work before a GPU is at hand; 6 is judged on CPU too. Writes the JSON to
`--output` (default benchmarks/results/gpu_check.json) and the markdown tables (the
README's GPU tables) beside it (.md); exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402  (puts the repository on sys.path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import model as M  # noqa: E402
from trainer import compute_batched_meta_gradient, compute_meta_gradient  # noqa: E402

COSINE_TARGET = 0.999       # autocast meta-gradient against fp32
DECODER_COSINE_TARGET = 0.99  # bf16 base (bf16 residual stream too) against fp32
KERNEL_COSINE_TARGET = 0.9999  # fused against math attention
BATCHED_TARGET = 2.0        # batched tasks: tasks per second against sequential
NO_CUDA = "skipped: no CUDA"
CHECKS = ("autocast_bf16", "autocast_fp16", "memory_table", "batched_tasks", "torchrun_nccl",
          "oom_retry", "attention_kernels", "decoder_bf16_base")
# The decoder of check 7 (LlamaConfig keyword overrides of model.tiny_decoder_config).
DECODER_SHAPE = dict(vocab_size=32000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=64, intermediate_size=1408,
                     max_position_embeddings=512)


def _cosine(a: dict, b: dict) -> float:
    x = torch.cat([a[n].float().flatten() for n in b if n != "inner_lr"])
    y = torch.cat([b[n].float().flatten() for n in b if n != "inner_lr"])
    return float(F.cosine_similarity(x, y, dim=0))


def _setting(args, shape: str | None = None) -> C.Setting:
    return C.Setting(shape or args.model_shape, args.n_way, args.k_shot, args.q_query,
                     args.seq_len, str(args.device), args.seed)


def _judged(cuda: bool, ok: bool) -> str:
    """A check's status: judged on CUDA, a CPU run only shows that the code works."""
    if not cuda:
        return NO_CUDA
    return "pass" if ok else "fail"


# ------------------------------------------------------------------------------------
# The checks (each returns its JSON entry without `name`)
# ------------------------------------------------------------------------------------

def check_autocast(args, dtype: torch.dtype) -> dict:
    """The exact meta-gradient under autocast against fp32 (dropout off, same episode)."""
    cuda = args.device.type == "cuda"
    net, theta = C.build_model(_setting(args), lora=True)
    net.eval()
    episode = C.make_episode(_setting(args))
    s, q, k = episode.support, episode.query, args.inner_steps
    _, reference = compute_meta_gradient(net, theta, s, q, C.inner_lr(), k, "full", seed=0, head_init="zero")
    with torch.autocast(args.device.type, dtype=dtype):
        loss, grads = compute_meta_gradient(net, theta, s, q, C.inner_lr(), k, "full", seed=0,
                                            head_init="zero")
    cosine = _cosine(grads, reference)
    finite = math.isfinite(float(loss)) and all(torch.isfinite(g).all() for g in grads.values())
    return {"status": _judged(cuda, finite and cosine >= COSINE_TARGET), "cosine": cosine,
            "target": COSINE_TARGET, "finite": finite, "dtype": str(dtype).removeprefix("torch.")}


MEMORY_ROWS = [  # label, job fields
    ("MAML, every weight, 2nd order", {"kind": "maml"}),
    ("FOMAML, every weight", {"kind": "fomaml"}),
    ("unrolled 2nd-order MAML over LoRA", {"kind": "unrolled_lora"}),
    ("MELoRA full", {"kind": "melora", "method": "full"}),
    ("MELoRA full, checkpointing", {"kind": "melora", "method": "full", "checkpointing": True}),
    ("MELoRA full, every graph kept", {"kind": "melora", "method": "full", "keep_graphs": 99}),
    ("MELoRA none (first order)", {"kind": "melora", "method": "none"}),
]


def check_memory_table(args) -> dict:
    """Extra peak memory of one meta-gradient for each row, measured in this process."""
    cuda = args.device.type == "cuda"
    setting = _setting(args, args.memory_shape)
    rows = []
    for label, fields in MEMORY_ROWS:
        job = {"setting": dataclasses.asdict(setting), "method": None, "checkpointing": False,
               "micro_batch": 0, "inner_steps": args.inner_steps, "threads": 0, **fields}
        net, theta = C.build_model(setting, lora=job["kind"] not in ("maml", "fomaml"))
        if job["checkpointing"]:
            M.enable_checkpointing(net, lora_only=True)
        work = C._work(job, net, theta, C.make_episode(setting))
        work()  # warm-up: lazy library state is not the method's memory
        window = C.MemoryWindow(args.device) if cuda else contextlib.nullcontext()
        start = time.perf_counter()
        with window:
            work()
        seconds = time.perf_counter() - start
        rows.append({"label": label, **{k: v for k, v in fields.items()}, "seconds": seconds,
                     "extra_mb": window.extra_mb if cuda else None})
        del net, theta, work
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    by = {r["label"]: r for r in rows}
    ok = cuda and (by["MELoRA full, checkpointing"]["extra_mb"]
                   < min(by["MAML, every weight, 2nd order"]["extra_mb"],
                         by["unrolled 2nd-order MAML over LoRA"]["extra_mb"]))
    return {"status": _judged(cuda, ok), "model_shape": setting.model_shape, "rows": rows,
            "memory_method": C.memory_method(args.device) if cuda else "not measured on CPU"}


def check_batched_tasks(args) -> dict:
    """Tasks per second of batched against sequential inner loops (interleaved rounds)."""
    cuda = args.device.type == "cuda"
    net, theta = C.build_model(_setting(args), lora=True)
    pairs = [(e.support, e.query) for e in
             (C.make_episode(_setting(args), index=t) for t in range(args.meta_batch))]
    lr, k = C.inner_lr(), args.inner_steps

    def sequential():
        for t, (s, q) in enumerate(pairs):
            compute_meta_gradient(net, theta, s, q, lr, k, "full", seed=t, head_init="zero")

    def batched():
        compute_batched_meta_gradient(net, theta, pairs, lr, k, "full", seed=0, head_init="zero")
    sequential(), batched()  # warm-up
    times = {"sequential": [], "batched": []}
    for _ in range(args.repeats):
        times["sequential"].append(C.timed(sequential, args.device))
        times["batched"].append(C.timed(batched, args.device))
    seq, bat = C.median(times["sequential"]), C.median(times["batched"])
    return {"status": _judged(cuda, seq / bat >= BATCHED_TARGET), "meta_batch": args.meta_batch,
            "sequential_tasks_per_second": args.meta_batch / seq,
            "batched_tasks_per_second": args.meta_batch / bat, "speedup": seq / bat,
            "target": BATCHED_TARGET, "seconds_all": times}


TINY_RUN = ["models.selected_model=tiny-bert", "datasets.synthetic_only=true", "tasks.n_way=3",
            "tasks.k_shot=2", "tasks.q_query=2", "models.max_length=16",
            "tracking.mlflow=false", "tracking.tensorboard=false"]


def check_torchrun(args) -> dict:
    """Two iterations under torchrun with one process (NCCL on CUDA)."""
    if args.device.type != "cuda":
        return {"status": NO_CUDA, "cpu_smoke": "not run (needs CUDA; the gloo path runs in "
                "tests/test_distributed.py)"}
    with tempfile.TemporaryDirectory() as out:
        sets = [a for key in TINY_RUN for a in ("--set", key)]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   "1", str(C.REPO / "main.py"), "--mode", "train", "--device", "cuda",
                   "--num_iterations", "2", "--meta_batch_size", "2", "--output_dir", out, *sets]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        done = subprocess.run(command, cwd=C.REPO, env=env, capture_output=True, text=True,
                              timeout=300)
        metrics = list(Path(out).rglob("metrics.jsonl"))
        lines = metrics[0].read_text().splitlines() if metrics else []
    ok = done.returncode == 0 and len(lines) == 2
    return {"status": "pass" if ok else "fail", "returncode": done.returncode,
            "iterations_logged": len(lines), "stderr_tail": done.stderr[-1500:] if not ok else ""}


def check_oom_retry(args) -> dict:
    """A training step that exceeds a per-process memory cap halves its micro-batch."""
    if args.device.type != "cuda":
        return {"status": NO_CUDA, "cpu_smoke": "not run (needs CUDA's allocator)"}
    import trainer as T
    from config import load_config
    device = args.device
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(overrides=[*TINY_RUN[:2], *TINY_RUN[-2:], "tasks.n_way=5",
                                     "tasks.k_shot=10", "tasks.q_query=10", "models.max_length=120",
                                     "synthetic.words_per_example=100",
                                     f"training.device={device}", f"training.output_dir={out}",
                                     "memory_optimization.hessian_approximation.method=full",
                                     "memory_optimization.checkpointing.enabled=false",
                                     "memory_optimization.gradient_accumulation.default_micro_batch=0",
                                     "memory_optimization.auto_micro_batch=true",
                                     "meta_learning.default_meta_batch_size=1"])
        tr = T.MetaTrainer.from_config(cfg, cache_dir=out)
        tasks = tr.sample_tasks(0)
        peaks = {}
        for micro in (0, 1):  # the whole set's peak and micro-batch 1's
            tr.micro_batch = micro
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            tr.meta_gradient(tasks, 0)
            peaks[micro] = torch.cuda.max_memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        cap = (peaks[0] + peaks[1]) / 2
        tr.micro_batch = 0
        gc.collect()
        torch.cuda.empty_cache()
        records = []
        handler = _Collect(records)
        logging.getLogger("melora").addHandler(handler)
        torch.cuda.set_per_process_memory_fraction(cap / total, device)
        try:
            stats = tr.train_step(0)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            logging.getLogger("melora").removeHandler(handler)
    retried = [r for r in records if "out of memory" in r]
    ok = bool(retried) and 0 < tr.micro_batch < 50 and math.isfinite(stats["meta_loss"])
    return {"status": "pass" if ok else "fail", "peak_whole_set_mb": peaks[0] / 2**20,
            "peak_micro_batch_1_mb": peaks[1] / 2**20, "cap_mb": cap / 2**20,
            "final_micro_batch": tr.micro_batch, "meta_loss": stats["meta_loss"],
            "log": retried[:3]}


class _Collect(logging.Handler):
    def __init__(self, records: list):
        super().__init__(logging.WARNING)
        self.records = records

    def emit(self, record):
        self.records.append(record.getMessage())


def check_attention_kernels(args) -> dict:
    """The default SDPA kernel against the math kernel: same numbers, and their times."""
    net, theta = C.build_model(_setting(args), lora=True)
    net.eval()
    episode = C.make_episode(_setting(args))
    s, q, k = episode.support, episode.query, args.inner_steps
    leaves = {n: t.detach().requires_grad_() for n, t in theta.items()}

    def step():
        loss = F.cross_entropy(M.forward(net, leaves, s), s["labels"])
        return torch.autograd.grad(loss, list(leaves.values()))
    results = {}
    for name, kernel in (("fused", contextlib.nullcontext), ("math", M.second_order_attention)):
        with kernel():
            with torch.no_grad():
                logits = M.forward(net, theta, q)
            grads = compute_meta_gradient(net, theta, s, q, C.inner_lr(), k, "none", seed=0,
                                          head_init="zero")[1]
            step()
            seconds = C.median([C.timed(step, args.device) for _ in range(args.repeats)])
        results[name] = {"logits": logits, "grads": grads, "seconds": seconds}
    f, m = results["fused"], results["math"]
    max_diff = float((f["logits"] - m["logits"]).abs().max() / m["logits"].abs().max().clamp(min=1e-12))
    cosine = _cosine(f["grads"], m["grads"])
    ok = cosine >= KERNEL_COSINE_TARGET and max_diff < 1e-2
    return {"status": "pass" if ok else "fail", "attention": getattr(net.backbone.config,
                                                                      "_attn_implementation", "eager"),
            "relative_logit_difference": max_diff, "gradient_cosine": cosine,
            "target_cosine": KERNEL_COSINE_TARGET, "fused_seconds": f["seconds"],
            "math_seconds": m["seconds"], "math_over_fused": m["seconds"] / f["seconds"]}


def check_decoder_bf16_base(args) -> dict:
    """A Llama-layout decoder with a bf16 frozen base against fp32 (same rounded weights)."""
    cuda = args.device.type == "cuda"
    shape = {} if args.quick else DECODER_SHAPE
    net, theta = _decoder(args, shape)
    setting = _setting(args)
    episode = C.make_episode(setting, vocab_size=net.backbone.config.vocab_size)
    s, q, k = episode.support, episode.query, args.inner_steps
    results = {}
    for name in ("fp32", "bf16"):
        if name == "bf16":
            M.cast_frozen_base(net, torch.bfloat16)
        autocast = torch.autocast(args.device.type, dtype=torch.bfloat16) if name == "bf16" \
            else contextlib.nullcontext()

        def work():
            with autocast:
                return compute_meta_gradient(net, theta, s, q, C.inner_lr(), k, "full", seed=0,
                                             head_init="zero")
        work()  # warm-up
        window = C.MemoryWindow(args.device) if cuda else contextlib.nullcontext()
        start = time.perf_counter()
        with window:
            loss, grads = work()
        results[name] = {"loss": float(loss), "grads": grads, "seconds": time.perf_counter() - start,
                         "extra_mb": window.extra_mb if cuda else None, "weights_mb": M.weights_mb(net)}
    bf16, fp32 = results["bf16"], results["fp32"]
    cosine = _cosine(bf16["grads"], fp32["grads"])
    fp32_theta = all(t.dtype == torch.float32 for t in theta.values()) and all(
        g.dtype == torch.float32 for g in bf16["grads"].values())
    finite = math.isfinite(bf16["loss"]) and all(torch.isfinite(g).all() for g in bf16["grads"].values())
    ok = cosine >= DECODER_COSINE_TARGET and fp32_theta and finite
    config = net.backbone.config
    return {"status": _judged(cuda, ok), "cosine": cosine, "target": DECODER_COSINE_TARGET,
            "theta_and_meta_gradient_fp32": fp32_theta, "finite": finite,
            "shape": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers",
                                                      "num_attention_heads", "num_key_value_heads",
                                                      "intermediate_size", "vocab_size")},
            **{f"{n}_{key}": results[n][key] for n in results for key in ("weights_mb", "extra_mb", "seconds")}}


def _decoder(args, shape: dict):
    """A random Llama-layout MELoRAModel with config.yml's LoRA (rounded to bf16 values)."""
    from config import load_config
    config, cls = M.tiny_decoder_config("llama", vocab=shape.get("vocab_size", 30522), **shape)
    config.use_cache = False
    lora = load_config().lora
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        net = M.MELoRAModel(cls(config), "llama", args.n_way, pooling="last", head="euclidean")
        M.inject_lora(net, lora.default_rank, lora.alpha, 0.0, lora.target_modules["llama"])
        theta = M.lora_parameters(net)
        with torch.no_grad():  # B away from zero, so the LoRA path carries a gradient signal
            for name, t in theta.items():
                if name.endswith("lora_B"):
                    t.normal_(0, 0.01)
            for p in net.parameters():  # the fp32 reference on the weights the bf16 base holds
                if not p.requires_grad:
                    p.copy_(p.to(torch.bfloat16).float())
    net = net.to(args.device).eval()
    return net, M.lora_parameters(net)


# ------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------

def run(args) -> dict:
    args.device = C.resolve(args.device)
    if args.device.type != "cuda":
        print("no CUDA device: CUDA criteria are skipped; the code paths run on a tiny model",
              file=sys.stderr, flush=True)
    plan = {"autocast_bf16": lambda: check_autocast(args, torch.bfloat16),
            "autocast_fp16": lambda: check_autocast(args, torch.float16),
            "memory_table": lambda: check_memory_table(args),
            "batched_tasks": lambda: check_batched_tasks(args),
            "torchrun_nccl": lambda: check_torchrun(args),
            "oom_retry": lambda: check_oom_retry(args),
            "attention_kernels": lambda: check_attention_kernels(args),
            "decoder_bf16_base": lambda: check_decoder_bf16_base(args)}
    checks = []
    for name in args.checks:
        start = time.perf_counter()
        try:
            entry = plan[name]()
        except Exception:  # noqa: BLE001  (one failing check must not hide the others)
            entry = {"status": "fail", "error": traceback.format_exc()[-3000:]}
        entry = {"name": name, **entry, "wall_seconds": time.perf_counter() - start}
        if entry["status"] == NO_CUDA:
            entry.setdefault("cpu_smoke", "ran")
        checks.append(entry)
        print(f"  {name}: {entry['status']} ({entry['wall_seconds']:.1f} s)", file=sys.stderr, flush=True)
    return {"hardware": C.hardware(args.device), "quick": args.quick,
            "settings": {k: (str(v) if isinstance(v, (torch.device, Path)) else v)
                         for k, v in vars(args).items()},
            "checks": checks, "failed": [c["name"] for c in checks if c["status"] == "fail"]}


def tables(r: dict) -> str:
    """Markdown: the status of every check, then the memory, batched and kernel tables."""
    by = {c["name"]: c for c in r["checks"]}
    lines = [C.header("GPU check", r["hardware"]), "", "| Check | Status | Result |", "| --- | --- | --- |"]
    for c in r["checks"]:
        judged = "" if c["status"] != NO_CUDA or c.get("cpu_smoke") != "ran" or "error" in c else \
            " (CPU run, not judged)"
        lines.append(f"| {c['name']} | {c['status']} | {_summary(c)}{judged} |")
    mem = by.get("memory_table", {})
    if "rows" in mem:
        lines += ["", f"Extra peak memory of one meta-gradient, random GPT-2 `{mem['model_shape']}` "
                  f"({mem['memory_method']}):", "", "| Configuration | Extra peak MiB | Seconds |",
                  "| --- | ---: | ---: |"]
        lines += [f"| {row['label']} | {C.fmt(row['extra_mb'])} | {row['seconds']:.3f} |" for row in mem["rows"]]
    bat = by.get("batched_tasks", {})
    if "speedup" in bat:
        lines += ["", f"Batched tasks (meta-batch {bat['meta_batch']}, `full`):", "",
                  "| Inner loops | Tasks / second |", "| --- | ---: |",
                  f"| one task after another | {bat['sequential_tasks_per_second']:.2f} |",
                  f"| batched | {bat['batched_tasks_per_second']:.2f} ({bat['speedup']:.2f}x) |"]
    att = by.get("attention_kernels", {})
    if "fused_seconds" in att:
        lines += ["", f"Attention kernels (implementation `{att['attention']}`), one support "
                  "forward+backward:", "", "| Kernel | Seconds |", "| --- | ---: |",
                  f"| default (fused where available) | {att['fused_seconds']:.4f} |",
                  f"| math (second-order graphs) | {att['math_seconds']:.4f} ({att['math_over_fused']:.2f}x) |"]
    dec = by.get("decoder_bf16_base", {})
    if "cosine" in dec:
        sh = dec["shape"]
        lines += ["", f"Decoder with a bf16 frozen base (random Llama layout: hidden {sh['hidden_size']}, "
                  f"{sh['num_hidden_layers']} layers, {sh['num_attention_heads']} heads / "
                  f"{sh['num_key_value_heads']} key-value heads, vocabulary {sh['vocab_size']}), one "
                  "exact meta-gradient:", "", "| Base | Weights MiB | Extra peak MiB | Seconds |",
                  "| --- | ---: | ---: | ---: |"]
        lines += [f"| {n} | {dec[n + '_weights_mb']:.1f} | {C.fmt(dec[n + '_extra_mb'])} | "
                  f"{dec[n + '_seconds']:.3f} |" for n in ("fp32", "bf16")]
    return "\n".join(lines)


def _summary(c: dict) -> str:
    if "error" in c:
        return "error: " + c["error"].strip().splitlines()[-1][:120]
    if c["name"] == "decoder_bf16_base" and "cosine" in c:
        return f"cosine {c['cosine']:.5f} (>= {c['target']}), theta and meta-gradient fp32: {c['theta_and_meta_gradient_fp32']}"
    if c["name"].startswith("autocast"):
        return f"cosine {c['cosine']:.5f} (>= {c['target']})"
    if c["name"] == "batched_tasks":
        return f"{c['speedup']:.2f}x tasks/s (>= {c['target']}x)"
    if c["name"] == "attention_kernels":
        return (f"gradient cosine {c['gradient_cosine']:.6f}, logits differ by "
                f"{c['relative_logit_difference']:.1e}; math {c['math_over_fused']:.2f}x the fused time")
    if c["name"] == "oom_retry" and "cap_mb" in c:
        return f"cap {c['cap_mb']:.0f} MiB: micro-batch 0 -> {c['final_micro_batch']}"
    if c["name"] == "torchrun_nccl" and "returncode" in c:
        return f"exit {c['returncode']}, {c['iterations_logged']} iterations logged"
    if c["name"] == "memory_table" and c.get("rows") and c["rows"][0]["extra_mb"] is not None:
        return "MELoRA full (checkpointing) below both second-order references"
    return "code ran on CPU" if c.get("cpu_smoke") == "ran" else c.get("cpu_smoke", "")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model and episodes (the CPU smoke run of the test suite)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=C.RESULTS / "gpu_check.json",
                        help="JSON; the markdown tables go next to it (.md)")
    parser.add_argument("--checks", default=",".join(CHECKS),
                        help="comma-separated subset of the checks to run, in this order")
    args = parser.parse_args(argv)
    args.checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in args.checks if c not in CHECKS]
    if unknown:
        parser.error(f"--checks: unknown checks {unknown}; choose from {', '.join(CHECKS)}")
    big = not args.quick
    args.model_shape = "gpt2-mini" if big else "tiny"
    args.memory_shape = "gpt2-small" if big else "tiny"
    args.n_way, args.k_shot, args.q_query = (5, 5, 5) if big else (2, 1, 1)
    args.seq_len = 64 if big else 8
    args.inner_steps = 3 if big else 1
    args.meta_batch = 8 if big else 2
    args.repeats = 5 if big else 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = C.run_benchmark(args, run, tables)
    markdown = Path(args.output).with_suffix(".md")
    from utils import atomic_write_text
    atomic_write_text(markdown, tables(result) + "\n")
    print(f"wrote {markdown}")
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
