"""Benchmark: seconds per meta-iteration of every MELoRA method, against two references.

On one random GPT-2-shaped model with LoRA and one episode (random token ids, every
example `seq_len` tokens), all in the same run:

1. Each Hessian method: seconds per meta-iteration (one task) and tasks per second, and
   the overhead ratio against the lower bound: one forward+backward per inner step
   plus one for the query, over the same LoRA tensors and the same batch.
2. Exact MELoRA (`full`) against second-order MAML over the same LoRA tensors by
   plain unrolled autograd (`create_graph=True` through the inner loop, as users write
   it with torch.func or higher; baseline.MAML): time ratio, and extra peak memory of
   each measured in a child process of its own (peak minus after model load); also for
   `full` with `keep_last_step` (the last inner step's graph kept, not recomputed).
3. Batched tasks: a meta-batch's inner loops run together
   (trainer.compute_batched_meta_gradient) against one task after another.

4. `--peer`: instead of 1-3, MELoRA against what a user writes instead, on a real
   encoder (default MiniLM-L6, shipped offline): PEFT LoRA (query, value; r=8, alpha 16)
   with second-order MAML by unrolled autograd over `torch.func.functional_call`
   (benchmarks/peer.py, its own implementation), and its first-order variant. MELoRA
   uses the same LoRA targets, rank, pooling and episode, dropout off: `full` with no
   kept graph, with every graph kept (`keep_graphs` = K), with checkpointing; `none`
   and `diagonal` (micro-batch 4) without checkpointing. Time ratios against the
   peer's second order (exact methods) or first order (the others): of the medians,
   and the range of the per-round (paired) ratios; extra peak memory of each in a
   child process of its own (peak minus after one warm-up meta-iteration).
   `--peer --prefix-cache`: MELoRA with LoRA on the top `--top-blocks` (2) of the 6 blocks,
   with and without the frozen-prefix cache (`model.enable_prefix_cache`; target >= 2x
   faster), and the speed-up expected of any such cache: the uncached runs time their
   frozen blocks.

Timings are interleaved (every candidate once per round, `--repeats` rounds, after one
untimed warm-up round; with --peer every other round runs in reverse order) and reported
as medians, so load on a shared machine hits all of them alike; compare ratios, not
absolute seconds. Prints markdown tables and writes
benchmarks/results/speed.json.

    python benchmarks/speed.py                                  # CPU defaults
    python benchmarks/speed.py --device cuda --model-shape gpt2-small --threads 0
    python benchmarks/speed.py --peer                           # MiniLM against the peer
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402  (puts the repository on sys.path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import baseline as B  # noqa: E402
import model as M  # noqa: E402
from trainer import (HESSIAN_METHODS, HessianOptions, compute_batched_meta_gradient,  # noqa: E402
                     compute_meta_gradient)

TIME_TARGET = 1.3      # exact MELoRA within 1.3x the unrolled-autograd time
MEMORY_TARGET = 0.3    # ... at no more than 0.3x its extra peak memory
BATCHED_TARGET = 2.0   # batched tasks: at least 2x tasks per second on CUDA
LOWER_BOUND = "lower bound"
UNROLLED = "unrolled autograd (LoRA)"
KEPT = "full, last step kept"  # HessianOptions(keep_last_step=True)


# ------------------------------------------------------------------------------------
# Candidates
# ------------------------------------------------------------------------------------

def lower_bound(net, theta, support, query, inner_steps: int):
    """One forward+backward per inner step on the support set, plus one on the query."""
    leaves = [t.detach().requires_grad_() for t in theta.values()]
    params = dict(zip(theta, leaves))

    def run():
        for batch in [support] * inner_steps + [query]:
            loss = F.cross_entropy(M.forward(net, params, batch), batch["labels"])
            torch.autograd.grad(loss, leaves)
    return run


def single_task(net, theta, episode, args) -> dict:
    """name -> closure of one meta-iteration on one task (the candidates of part 1-2)."""
    lr, s, q, k = C.inner_lr(), episode.support, episode.query, args.inner_steps
    fns = {LOWER_BOUND: lower_bound(net, theta, s, q, k)}
    for method in args.methods:
        fns[method] = (lambda m: lambda: compute_meta_gradient(
            net, theta, s, q, lr, k, m, args.micro_batch, seed=0, head_init="zero"))(method)
    kept = HessianOptions(keep_last_step=True)
    fns[KEPT] = lambda: compute_meta_gradient(net, theta, s, q, lr, k, "full", args.micro_batch,
                                              hessian=kept, seed=0, head_init="zero")
    unrolled = B.MAML(net, theta, lr, k, outer_lr=0.0, grad_clip=0.0, head_init="zero")
    fns[UNROLLED] = lambda: unrolled.meta_gradient([episode])
    return fns


def batched_tasks(net, theta, episodes, args) -> dict:
    """Sequential and batched meta-gradients of one meta-batch."""
    lr, k, pairs = C.inner_lr(), args.inner_steps, [(e.support, e.query) for e in episodes]

    def sequential():
        for t, (s, q) in enumerate(pairs):
            compute_meta_gradient(net, theta, s, q, lr, k, args.batched_method,
                                  args.micro_batch, seed=t, head_init="zero")
    return {"sequential": sequential,
            "batched": lambda: compute_batched_meta_gradient(
                net, theta, pairs, lr, k, args.batched_method, args.micro_batch, seed=0, head_init="zero")}


def interleaved(fns: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of every candidate, once per round, after an untimed warm-up round."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(C.timed(fn, device))
    return times


# ------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------

def run(args) -> dict:
    device = C.resolve(args.device)
    setting = C.Setting(args.model_shape, args.n_way, args.k_shot, args.q_query, args.seq_len,
                        str(device), args.seed)
    load_before = C.load_average()
    net, theta = C.build_model(setting, lora=True)
    episodes = [C.make_episode(setting, index=t) for t in range(args.meta_batch)]

    # 1-2. One task: every method, the lower bound and unrolled autograd, interleaved.
    single = interleaved(single_task(net, theta, episodes[0], args), args.repeats, device)
    print("  timed single-task candidates", file=sys.stderr, flush=True)
    # 3. A meta-batch: sequential against batched inner loops.
    batched = interleaved(batched_tasks(net, theta, episodes, args), args.repeats, device)
    print("  timed batched tasks", file=sys.stderr, flush=True)
    # Memory of exact MELoRA and of unrolled autograd, each in a child of its own.
    memory = {}
    for name, kind, keep in (("melora", "melora", False), ("melora_kept", "melora", True),
                             ("unrolled_lora", "unrolled_lora", False)):
        job = {"setting": dataclasses.asdict(setting), "kind": kind, "method": "full",
               "checkpointing": False, "micro_batch": args.micro_batch,
               "inner_steps": args.inner_steps, "threads": args.threads, "keep_last_step": keep}
        memory[name] = C.run_in_child(C.measure, job)
        print(f"  memory {name}: {C.fmt(memory[name].get('extra_mb'))} MiB", file=sys.stderr, flush=True)
    return summarize(args, setting, device, single, batched, memory, net, theta,
                     {"before": load_before, "after": C.load_average()})


def summarize(args, setting, device, single, batched, memory, net, theta, load) -> dict:
    """Medians, ratios and targets: the JSON written and the tables printed."""
    med = {name: C.median(ts) for name, ts in single.items()}
    bound = med[LOWER_BOUND]
    methods = {name: {"seconds_per_iteration": t, "tasks_per_second": 1 / t,
                      "overhead_vs_lower_bound": t / bound, "seconds_all": single[name]}
               for name, t in med.items()}
    unrolled = memory["unrolled_lora"]

    def against_unrolled(name: str, melora: dict) -> dict:
        time_ratio = med[name] / med[UNROLLED] if name in med else None
        # each round times both back to back: its ratio is a paired measurement
        rounds = [a / b for a, b in zip(single.get(name, []), single[UNROLLED])]
        mem_ratio = (melora["extra_mb"] / unrolled["extra_mb"]
                     if "error" not in melora and "error" not in unrolled else None)
        return {"time_ratio": time_ratio, "time_ratio_rounds": rounds,
                "memory_ratio": mem_ratio, "melora": melora,
                "met": (time_ratio is not None and mem_ratio is not None
                        and time_ratio <= TIME_TARGET and mem_ratio <= MEMORY_TARGET)}
    seq, bat = C.median(batched["sequential"]), C.median(batched["batched"])
    n_theta = sum(t.numel() for t in theta.values())
    return {
        "hardware": C.hardware(device), "load_average": load,
        "setting": dataclasses.asdict(setting), "inner_steps": args.inner_steps,
        "inner_lr": C.inner_lr(), "micro_batch": args.micro_batch, "repeats": args.repeats,
        "parameters": {"model": sum(p.numel() for p in net.parameters()), "melora_theta": n_theta},
        "methods": methods,
        "vs_unrolled": {"full": against_unrolled("full", memory["melora"]),
                        KEPT: against_unrolled(KEPT, memory["melora_kept"]),
                        "unrolled_lora": unrolled,
                        "time_target": TIME_TARGET, "memory_target": MEMORY_TARGET},
        "batched": {"method": args.batched_method, "meta_batch": args.meta_batch,
                    "sequential_seconds": seq, "batched_seconds": bat,
                    "sequential_tasks_per_second": args.meta_batch / seq,
                    "batched_tasks_per_second": args.meta_batch / bat, "speedup": seq / bat,
                    "seconds_all": batched, "target_on_cuda": BATCHED_TARGET,
                    "met": (seq / bat >= BATCHED_TARGET) if device.type == "cuda" else None},
    }


# ------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------

def tables(r: dict) -> str:
    """The markdown printed at the end (and pasted into the README)."""
    s, p, hw = r["setting"], r["parameters"], r["hardware"]
    load = r["load_average"]
    lines = [C.header("Speed: one meta-iteration", hw), "",
             C.describe_setting(s, p) + f" K = {r['inner_steps']} inner steps, micro-batch "
             f"{'whole set' if r['micro_batch'] == 0 else r['micro_batch']}, no checkpointing. "
             f"Medians of {r['repeats']} interleaved rounds"
             + (f"; load average {load['before'][0]} before, {load['after'][0]} after." if load["before"] else "."),
             "", "| Method | Seconds / meta-iteration | Tasks / second | Overhead vs lower bound |",
             "| --- | ---: | ---: | ---: |"]
    for name, m in r["methods"].items():
        label = {LOWER_BOUND: "lower bound: K+1 forward+backward"}.get(name, name)
        lines.append(f"| {label} | {m['seconds_per_iteration']:.3f} | {m['tasks_per_second']:.2f} | "
                     f"{m['overhead_vs_lower_bound']:.2f}x |")
    lines += ["", *_unrolled_lines(r["vs_unrolled"], r["methods"]), "", *_batched_lines(r["batched"], hw)]
    return "\n".join(lines)


def _unrolled_lines(u: dict, methods: dict) -> list[str]:
    un = u["unrolled_lora"]
    lines = ["Exact second order over the same LoRA tensors: MELoRA `full` (reverse recomputation; "
             "`keep_last_step` keeps the last inner step's graph instead of recomputing it) against "
             "unrolled autograd. Extra peak = peak during the meta-gradient minus after model load, "
             "each in its own child process. Time ratio: of the medians (in brackets, the range "
             "of the per-round ratios). Targets "
             f"<= {u['time_target']}x time and <= {u['memory_target']}x memory.", "",
             "| | Seconds / meta-iteration | Extra peak memory (MiB) | Time ratio (rounds) | Memory ratio | Both targets |",
             "| --- | ---: | ---: | ---: | ---: | --- |",
             f"| unrolled autograd | {C.fmt(methods[UNROLLED]['seconds_per_iteration'], 3)} | "
             f"{C.fmt(un.get('extra_mb'))} | 1.00x | 1.00x | |"]
    for name, label in (("full", "MELoRA full"), (KEPT, "MELoRA full, keep_last_step")):
        r = u[name]
        rounds = r["time_ratio_rounds"]
        spread = f" ({min(rounds):.2f}-{max(rounds):.2f})" if rounds else ""
        lines.append(f"| {label} | {C.fmt(methods.get(name, {}).get('seconds_per_iteration'), 3)} | "
                     f"{C.fmt(r['melora'].get('extra_mb'))} | {C.fmt(r['time_ratio'], 2)}x{spread} | "
                     f"{C.fmt(r['memory_ratio'], 2)}x | {'met' if r['met'] else '**not met**'} |")
    return lines


def _batched_lines(b: dict, hw: dict) -> list[str]:
    met = {None: "CPU: reported only", True: "met", False: "**not met**"}[b["met"]]
    return [f"Batched tasks: meta-batch of {b['meta_batch']}, method `{b['method']}` "
            f"(target on CUDA: >= {b['target_on_cuda']}x tasks per second; {met}).", "",
            "| Inner loops | Seconds / meta-batch | Tasks / second | Speed-up |",
            "| --- | ---: | ---: | ---: |",
            f"| one task after another | {b['sequential_seconds']:.3f} | "
            f"{b['sequential_tasks_per_second']:.2f} | 1.00x |",
            f"| batched (compute_batched_meta_gradient) | {b['batched_seconds']:.3f} | "
            f"{b['batched_tasks_per_second']:.2f} | {b['speedup']:.2f}x |"]


# ------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = C.episode_parser(__doc__.splitlines()[0], "gpt2-mini", 4, "K")
    parser.add_argument("--micro-batch", type=int, default=0, help="0 = the whole set")
    parser.add_argument("--methods", type=C.parse_methods, default=list(HESSIAN_METHODS),
                        help="MELoRA Hessian methods to time, comma-separated")
    parser.add_argument("--meta-batch", type=int, default=8, help="tasks of the batched comparison")
    parser.add_argument("--batched-method", default="full", choices=list(HESSIAN_METHODS))
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (medians reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0 = torch's default); see benchmarks/common.py")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON (default benchmarks/results/speed.json, speed_peer.json with --peer)")
    parser.add_argument("--peer", action="store_true",
                        help="MELoRA against PEFT LoRA + torch.func MAML on --peer-model (part 4)")
    parser.add_argument("--prefix-cache", action="store_true",
                        help="with --peer: LoRA on the top --top-blocks blocks with and without "
                             "the frozen-prefix cache, instead of the peer comparison")
    parser.add_argument("--top-blocks", type=int, default=2,
                        help="--prefix-cache: how many of the top blocks get LoRA (default 2 of 6)")
    parser.add_argument("--peer-model", default="minilm-l6",
                        help="--peer: minilm-l6 or a local Hugging Face BERT-family directory")
    parser.add_argument("--peer-tasks", type=int, default=2, help="--peer: tasks per meta-iteration")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="--peer on CPU: wall time, or this process's CPU time (steadier on a "
                             "shared machine)")
    parser.add_argument("--no-memory", action="store_true", help="--peer: skip the memory children")
    args = parser.parse_args(argv)
    if args.peer and args.clock == "cpu" and args.device.startswith("cuda"):
        parser.error("--clock cpu measures CPU time; on CUDA use --clock wall")
    if args.output is None:
        args.output = C.RESULTS / ("speed_prefix_cache.json" if args.prefix_cache else
                                   "speed_peer.json" if args.peer else "speed.json")
    if args.prefix_cache and not args.peer:
        parser.error("--prefix-cache is a variant of --peer: pass both")
    if args.top_blocks < 1:
        parser.error(f"--top-blocks must be at least 1, got {args.top_blocks}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.peer:
        return C.run_benchmark(args, run_peer, peer_tables)
    return C.run_benchmark(args, run, tables)


# ------------------------------------------------------------------------------------
# --peer: MELoRA against PEFT LoRA + torch.func MAML on a real encoder
# ------------------------------------------------------------------------------------

PEER_SECOND, PEER_FIRST = "peer: PEFT LoRA + unrolled 2nd order", "peer: PEFT LoRA first order"
PEER_CANDIDATES = {  # name -> (kind, fields); a reference sits next to what it is divided by
    PEER_SECOND: ("peer", {"first_order": False}),
    "MELoRA full, every graph kept": ("melora", {"method": "full", "keep_graphs": 99}),
    "MELoRA full, no graph kept": ("melora", {"method": "full", "keep_graphs": 0}),
    "MELoRA full, checkpointing": ("melora", {"method": "full", "checkpointing": True}),
    PEER_FIRST: ("peer", {"first_order": True}),
    "MELoRA none": ("melora", {"method": "none"}),
    "MELoRA diagonal, micro-batch 4": ("melora", {"method": "diagonal", "micro_batch": 4}),
}
PEER_TARGETS = {  # name -> (reference, time target, memory target)
    "MELoRA full, every graph kept": (PEER_SECOND, 1.05, 1.0),
    "MELoRA full, no graph kept": (PEER_SECOND, 1.45, 0.4),
    "MELoRA none": (PEER_FIRST, 1.05, None),
    "MELoRA diagonal, micro-batch 4": (PEER_FIRST, None, None),
    "MELoRA full, checkpointing": (PEER_SECOND, None, None),
}
# A memory target counts as met within this fraction: extra peak RSS of one configuration
# varies by ~0.2% between child processes, and at the settings MELoRA with every
# graph kept holds one hidden-state tensor (1.2 MiB of ~550) more than the peer at the
# peak (the torch profiler's allocation timeline), which no RSS reading can resolve.
MEMORY_RESOLUTION = 0.01
# --prefix-cache: LoRA on the top `--top-blocks` blocks only, with and without the cache
FULL_PLAIN, NONE_PLAIN = "MELoRA full, top blocks, no cache", "MELoRA none, top blocks, no cache"
CACHE_CANDIDATES = {
    FULL_PLAIN: ("melora", {"method": "full", "top": True}),
    "MELoRA full, top blocks, prefix cache": ("melora", {"method": "full", "top": True, "cache": True}),
    "MELoRA full, top blocks, prefix cache, every graph kept":
        ("melora", {"method": "full", "top": True, "cache": True, "keep_graphs": 99}),
    NONE_PLAIN: ("melora", {"method": "none", "top": True}),
    "MELoRA none, top blocks, prefix cache": ("melora", {"method": "none", "top": True, "cache": True}),
}
CACHE_TARGETS = {  # the cache against the same configuration without it: >= 2x faster
    "MELoRA full, top blocks, prefix cache": (FULL_PLAIN, 0.5, None),
    "MELoRA full, top blocks, prefix cache, every graph kept": (FULL_PLAIN, None, None),
    "MELoRA none, top blocks, prefix cache": (NONE_PLAIN, 0.5, None),
}
PEER_LORA = {"rank": 8, "alpha": 16.0, "peft_targets": ["query", "value"],
             "melora_targets": ["attention.self.query", "attention.self.value"]}


def peer_candidate(job: dict):
    """One candidate: (closure of one meta-iteration over `job['tasks']` tasks, the model,
    a probe). Without the prefix cache but with top-block LoRA, the probe's "seconds"
    adds up the time spent in the frozen blocks below the lowest LoRA block (what the
    cache can save); otherwise it stays None."""
    import peer as P
    from trainer import HessianOptions, compute_meta_gradient
    device = torch.device(job["device"])
    name, lr, k = job["model"], job["inner_lr"], job["inner_steps"]
    kind, fields = {**PEER_CANDIDATES, **CACHE_CANDIDATES}[job["candidate"]]
    path = str(M.minilm_path()) if name == "minilm-l6" else name
    probe = {"seconds": None}
    if kind == "peer":
        net, theta = P.build_peer(path, job["n_way"], PEER_LORA["rank"], PEER_LORA["alpha"],
                                  PEER_LORA["peft_targets"], device=device)
    else:
        net, _ = M.load_model(name, job["n_way"], pooling="mean", dropout=0.0)
        blocks = M._block_lists(net.backbone)[0]
        layers = list(range(len(blocks) - job["top_blocks"], len(blocks))) if fields.get("top") else None
        if layers and layers[0] <= 0:
            raise ValueError(f"--top-blocks {job['top_blocks']} leaves no frozen block below the LoRA "
                             f"in this {len(blocks)}-block model: pass fewer")
        M.inject_lora(net, PEER_LORA["rank"], PEER_LORA["alpha"], 0.0, PEER_LORA["melora_targets"],
                      layers=layers)
        net = net.to(device)
        if fields.get("cache"):
            M.enable_prefix_cache(net)
        elif layers:
            _time_frozen_blocks(blocks[:layers[0]], probe, device, job.get("clock", "wall"))
        theta = M.lora_parameters(net)
        if fields.get("checkpointing"):
            M.enable_checkpointing(net, lora_only=True)
    net.eval()  # dropout off in both
    episodes = [_peer_episode(net, job, t) for t in range(job["tasks"])]
    if kind == "peer":
        def run():
            for e in episodes:
                P.maml_meta_gradient(net, theta, e.support, e.query, lr, k, fields["first_order"])
    else:
        hessian = HessianOptions(keep_graphs=fields.get("keep_graphs", 0))

        def run():
            for t, e in enumerate(episodes):
                compute_meta_gradient(net, theta, e.support, e.query, lr, k, fields["method"],
                                      fields.get("micro_batch", 0), hessian=hessian, seed=t,
                                      metrics={}, acc_before=False, head_init="zero")
    return run, net, probe


def _time_frozen_blocks(frozen, probe: dict, device: torch.device, clock: str) -> None:
    """Add the seconds from entering frozen[0] to leaving frozen[-1] to probe["seconds"]."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    started = []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def enter(*_):
        sync()
        started.append(now())

    def leave(*_):
        sync()
        probe["seconds"] = (probe["seconds"] or 0.0) + now() - started.pop()
    frozen[0].register_forward_pre_hook(enter)
    frozen[-1].register_forward_hook(leave)


def _peer_episode(net, job: dict, index: int):
    """Random token ids of the encoder's vocabulary, every example `seq_len` tokens."""
    vocab = net.backbone.config.vocab_size
    setting = C.Setting("tiny", job["n_way"], job["k_shot"], job["q_query"], job["seq_len"],
                        job["device"], job["seed"])
    return C.make_episode(setting, index=index, vocab_size=vocab)


def measure_peer(job: dict) -> dict:
    """Extra peak memory of one meta-iteration after a warm-up one (a child process)."""
    C._fix_mmap_threshold()
    C.set_threads(job["threads"])
    run, _, _ = peer_candidate(job)
    run()  # warm-up: lazy library state and first-call allocations are not the method's
    window = C.MemoryWindow(torch.device(job["device"]))
    with window:
        seconds = C.timed(run, torch.device(job["device"]))
    return {**job, "extra_mb": window.extra_mb, "seconds": seconds}


def run_peer(args) -> dict:
    device = C.resolve(args.device)
    job = {"model": args.peer_model, "device": str(device), "n_way": args.n_way,
           "k_shot": args.k_shot, "q_query": args.q_query, "seq_len": args.seq_len,
           "inner_steps": args.inner_steps, "inner_lr": C.inner_lr(), "tasks": args.peer_tasks,
           "seed": args.seed, "threads": args.threads, "clock": args.clock,
           "top_blocks": args.top_blocks}
    load_before = C.load_average()
    candidates = CACHE_CANDIDATES if args.prefix_cache else PEER_CANDIDATES
    built = {name: peer_candidate({**job, "candidate": name}) for name in candidates}
    clock = time.process_time if args.clock == "cpu" else None
    for fn, _, _ in built.values():
        fn()  # warm-up round
    times: dict[str, list[float]] = {name: [] for name in built}
    frozen: dict[str, list[float]] = {name: [] for name, (_, _, probe) in built.items()
                                      if probe["seconds"] is not None}
    order = list(built)
    for r in range(args.repeats):
        # every other round runs backwards, so a drift in the machine's speed hits
        # each candidate and its reference (its neighbour) alike
        for name in order if r % 2 == 0 else order[::-1]:
            fn, _, probe = built[name]
            probe["seconds"] = 0.0 if name in frozen else None
            if clock is None:
                times[name].append(C.timed(fn, device))
            else:
                start = clock()
                fn()
                times[name].append(clock() - start)
            if name in frozen:
                frozen[name].append(probe["seconds"])
        print(f"  round {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
    del built
    memory = {}
    if not args.no_memory:
        for name in candidates:
            memory[name] = C.run_in_child(measure_peer, {**job, "candidate": name})
            print(f"  memory {name}: {C.fmt(memory[name].get('extra_mb'))} MiB", file=sys.stderr, flush=True)
    return summarize_peer(args, job, times, frozen, memory,
                          {"before": load_before, "after": C.load_average()}, device)


def summarize_peer(args, job, times, frozen, memory, load, device) -> dict:
    med = {name: C.median(ts) for name, ts in times.items()}
    rows = {}
    candidates, targets = ((CACHE_CANDIDATES, CACHE_TARGETS) if args.prefix_cache
                           else (PEER_CANDIDATES, PEER_TARGETS))
    for name in candidates:
        ref, t_target, m_target = targets.get(name, (None, None, None))
        row = {"seconds_per_iteration": med[name], "seconds_all": times[name],
               "extra_mb": memory.get(name, {}).get("extra_mb"), "reference": ref}
        if name in frozen:  # the share of its time in the frozen blocks the cache skips
            row["frozen_seconds_all"] = frozen[name]
            row["frozen_share"] = C.median([f / t for f, t in zip(frozen[name], times[name])])
        if ref is not None:
            rounds = [a / b for a, b in zip(times[name], times[ref])]
            ref_mb = memory.get(ref, {}).get("extra_mb")
            mem_ratio = row["extra_mb"] / ref_mb if row["extra_mb"] is not None and ref_mb else None
            row.update({"time_ratio": med[name] / med[ref], "time_ratio_rounds": rounds,
                        "memory_ratio": mem_ratio, "time_target": t_target,
                        "memory_target": m_target})
            if ref in frozen:  # what skipping exactly the time measured in the frozen blocks gives
                row["speedup_expected"] = 1 / (1 - rows[ref]["frozen_share"])
            checks = [row["time_ratio"] <= t_target] if t_target else []
            if m_target is not None:
                checks.append(mem_ratio is not None and mem_ratio <= m_target * (1 + MEMORY_RESOLUTION))
            row["met"] = all(checks) if checks else None
        rows[name] = row
    return {"hardware": C.hardware(device), "load_average": load, "peer": True, "job": job,
            "prefix_cache": args.prefix_cache,
            "clock": args.clock, "repeats": args.repeats, "lora": PEER_LORA,
            "memory_resolution": MEMORY_RESOLUTION, "candidates": rows}


def peer_tables(r: dict) -> str:
    j, load, cache = r["job"], r["load_average"], r.get("prefix_cache")
    title = (f"Speed: the frozen-prefix cache (LoRA on the top {j['top_blocks']} blocks)" if cache
             else "Speed: MELoRA against the peer (PEFT LoRA + torch.func MAML)")
    lines = [C.header(title, r["hardware"]), "",
             f"Model {j['model']}, LoRA on query and value, r={r['lora']['rank']}, alpha "
             f"{r['lora']['alpha']}, mean pooling, dropout off. Episodes: {j['n_way']}-way "
             f"{j['k_shot']}-shot, {j['q_query']} queries per class, {j['seq_len']} tokens (random "
             f"ids); K = {j['inner_steps']}, {j['tasks']} task(s) per meta-iteration, one after "
             f"another; {j['threads']} thread(s). Medians of {r['repeats']} interleaved rounds "
             f"({r['clock']} clock; every other round in reverse order); ratios: of the medians "
             "(in brackets, the range of the per-round paired ratios). Extra peak: each in a "
             "child process, peak minus after a warm-up meta-iteration; a memory target is met "
             f"within {MEMORY_RESOLUTION:.0%} (the resolution of RSS)"
             + (f"; load average {load['before'][0]} before, {load['after'][0]} after." if load["before"] else ".")]
    if cache:
        lines += ["", "Expected: the speed-up if the cache saved exactly the time the uncached "
                  "run spends inside the frozen blocks (timed there), 1 / (1 - that share): "
                  "what any cache of those blocks can give, give or take what the in-block "
                  "timing does not see."]
    extra = " Speed-up (expected) |" if cache else ""
    lines += ["", "| Configuration | s / meta-iteration | Time ratio (rounds) | Extra peak MiB | "
              "Memory ratio | Target | Met |" + extra,
              "| --- | ---: | ---: | ---: | ---: | --- | --- |" + (" ---: |" if cache else "")]
    for name, row in r["candidates"].items():
        if row["reference"] is None:
            share = (f" frozen blocks: {100 * row['frozen_share']:.0f}% of its time |"
                     if "frozen_share" in row else " |" if cache else "")
            lines.append(f"| {name} | {row['seconds_per_iteration']:.3f} | 1.00x | "
                         f"{C.fmt(row['extra_mb'])} | 1.00x | | |" + share)
            continue
        rounds = row["time_ratio_rounds"]
        ref = {PEER_SECOND: "peer 2nd", PEER_FIRST: "peer 1st"}.get(row["reference"], "no cache")
        target = ", ".join(x for x in (
            f"time <= {row['time_target']}x" if row["time_target"] else "",
            f"memory <= {row['memory_target']}x" if row["memory_target"] is not None else "") if x)
        met = {None: "-", True: "met", False: "**not met**"}[row["met"]]
        speedup = (f" {1 / row['time_ratio']:.2f}x ({C.fmt(row.get('speedup_expected'), 2)}x) |"
                 if cache else "")
        lines.append(f"| {name} | {row['seconds_per_iteration']:.3f} | {row['time_ratio']:.2f}x of "
                     f"{ref} ({min(rounds):.2f}-{max(rounds):.2f}) | {C.fmt(row['extra_mb'])} | "
                     f"{C.fmt(row['memory_ratio'], 3)}x | {target or '-'} | {met} |" + speedup)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
