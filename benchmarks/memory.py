"""Benchmark: peak memory of one meta-gradient, MELoRA against full-parameter MAML.

Same random GPT-2-shaped model, same episode (N-way K-shot, Q queries, `seq_len` random
tokens per example), same inner steps K for every configuration:

- `maml`: second order over every weight, unrolled autograd (`create_graph=True`
  through the inner loop, as learn2learn and higher do; baseline.MAML);
- `fomaml`: the same, inner gradients detached (baseline.FOMAML);
- `melora`: trainer.compute_meta_gradient (reverse recomputation) over LoRA + head, for
  each Hessian method, with and without checkpointing, at each micro-batch size;
- `idle`: a child that loads the model and does nothing: the measurement's floor.

Then peak memory against K for MELoRA `full` and MAML. Every configuration runs in a
child process of its own (see benchmarks/common.py for how memory is read). Prints
markdown tables and writes benchmarks/results/memory.json.

    python benchmarks/memory.py                       # CPU defaults (GPT-2-small shape)
    python benchmarks/memory.py --device cuda --seq-len 64 --k-shot 5
    python benchmarks/memory.py --model-shape tiny --k-sweep 1,2   # a quick smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402  (puts the repository on sys.path)

import torch  # noqa: E402

from trainer import HESSIAN_METHODS  # noqa: E402

REDUCTION_TARGET = 0.90   # MELoRA full: at least 90% less extra peak memory than MAML
FLAT_TOLERANCE = 0.10     # MELoRA full's peak across K stays within 10%
SAFE_SHARE = 0.8          # run a MAML child only if its predicted peak < 80% of free memory


# ------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------

def jobs(setting: C.Setting, args) -> tuple[list[dict], list[dict]]:
    """(grid jobs at --inner-steps, K-sweep jobs); the sweep reuses grid rows it shares."""
    base = {"setting": dataclasses.asdict(setting), "method": None, "checkpointing": False,
            "micro_batch": 0, "inner_steps": args.inner_steps, "threads": args.threads,
            "base_dtype": "fp32", "keep_graphs": 0}
    grid = []
    for dtype in args.base_dtypes:  # the frozen base's dtype (MAML: every weight's)
        at = {**base, "base_dtype": dtype}
        grid += [{**at, "kind": kind} for kind in (("idle", "maml") if args.no_fomaml
                                                   else ("idle", "maml", "fomaml"))]
        if not args.no_grid:
            grid += [{**at, "kind": "melora", "method": m, "checkpointing": ckpt, "micro_batch": mb,
                      "keep_graphs": keep}
                     for m in args.methods for ckpt in args.checkpointing for mb in args.micro_batches
                     for keep in (args.keep_graphs if m == "full" else [0])]
    sweep = []
    for k in args.k_sweep:
        sweep += [{**base, "kind": "maml", "inner_steps": k},
                  {**base, "kind": "melora", "method": "full", "inner_steps": k}]
    return grid, sweep


def run(args) -> dict:
    """Every configuration in its own child; the results dict written to JSON.

    At most `--jobs` children run at a time (each child's memory is its own). The
    full-parameter MAML/FOMAML children run one after another in order of K, and a MAML
    child whose extrapolated peak would not fit in the free memory is skipped and says so.
    """
    device = C.resolve(args.device)
    setting = C.Setting(args.model_shape, args.n_way, args.k_shot, args.q_query, args.seq_len,
                        str(device), args.seed)
    grid_jobs, sweep_jobs = jobs(setting, args)
    load_before = C.load_average()
    unique = {_key(j): j for j in grid_jobs + sweep_jobs}
    large = sorted((j for j in unique.values() if j["kind"] in ("maml", "fomaml")),
                   key=lambda j: (j["kind"], j["inner_steps"]))
    small = [j for j in unique.values() if j not in large]
    done: dict[str, dict] = {}

    def large_lane() -> dict[str, dict]:  # one after another: the guard sees the last peak
        seen: dict[str, dict] = {}
        for job in large:
            seen[_key(job)] = _skip_if_too_large(job, seen, device) or _run_one(job)
        return seen

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # threads that each wait on a child
        lane = pool.submit(large_lane)
        for job, result in zip(small, pool.map(_run_one, small)):
            done[_key(job)] = result
    done.update(lane.result())
    grid = [done[_key(j)] for j in grid_jobs]
    sweep = [done[_key(j)] for j in sweep_jobs]
    return {"hardware": C.hardware(device), "memory_method": C.memory_method(device),
            "load_average": {"before": load_before, "after": C.load_average()},
            "setting": dataclasses.asdict(setting), "inner_steps": args.inner_steps,
            "inner_lr": C.inner_lr(), "parameters": _parameter_counts(setting), "grid": grid,
            "k_sweep": sweep, "targets": targets(grid, sweep)}


def _run_one(job: dict) -> dict:
    started = time.perf_counter()
    result = C.run_in_child(C.measure, job)
    print(f"  {_label(job):<44} {_mb_cell(result):>14} MiB  ({time.perf_counter() - started:.0f} s)",
          file=sys.stderr, flush=True)
    return result


def _skip_if_too_large(job: dict, done: dict, device: torch.device) -> dict | None:
    """A skipped row when MAML's peak, extrapolated linearly in K, exceeds free memory."""
    seen = sorted((r["inner_steps"], r["extra_mb"]) for r in done.values()
                  if r["kind"] == job["kind"] and "error" not in r)
    if not seen or device.type == "cuda":
        return None  # CUDA raises OutOfMemoryError itself; the CPU OOM killer is less kind
    import psutil
    (k0, m0), (k1, m1) = seen[0], seen[-1]
    slope = (m1 - m0) / (k1 - k0) if k1 > k0 else m0 / k0
    predicted = m1 + slope * (job["inner_steps"] - k1)
    free = psutil.virtual_memory().available / 2**20
    if predicted < SAFE_SHARE * free:
        return None
    print(f"  {_label(job):<44} skipped: predicted {predicted:,.0f} MiB, free {free:,.0f} MiB",
          file=sys.stderr, flush=True)
    return {**job, "error": f"skipped: predicted {predicted:,.0f} MiB > {SAFE_SHARE:.0%} of "
                            f"free memory ({free:,.0f} MiB)"}


def _key(job: dict) -> str:
    return "|".join(str(job.get(k)) for k in ("kind", "method", "checkpointing", "micro_batch",
                                               "inner_steps", "base_dtype", "keep_graphs"))


def _label(job: dict) -> str:
    dtype = "" if job.get("base_dtype", "fp32") == "fp32" else f" {job['base_dtype']}"
    if job["kind"] != "melora":
        return f"{job['kind']}{dtype} K={job['inner_steps']}"
    kept = f" kept={job['keep_graphs']}" if job.get("keep_graphs") else ""
    return (f"melora {job['method']}{dtype} ckpt={'on' if job['checkpointing'] else 'off'} "
            f"mb={_mb(job['micro_batch'])}{kept} K={job['inner_steps']}")


def _mb(micro_batch: int) -> str:
    return "all" if micro_batch == 0 else str(micro_batch)


def _parameter_counts(setting: C.Setting) -> dict:
    net, theta = C.build_model(dataclasses.replace(setting, device="cpu"), lora=True)
    lora = sum(t.numel() for t in theta.values())
    base = sum(p.numel() for n, p in net.named_parameters() if n not in theta)
    return {"model": base + net.head.weight.numel() + net.head.bias.numel(), "melora_theta": lora}


# ------------------------------------------------------------------------------------
# Targets and tables
# ------------------------------------------------------------------------------------

def targets(grid: list[dict], sweep: list[dict]) -> dict:
    """The issue's claims, each with the measured numbers behind it (the first base dtype's rows)."""
    first = grid[0].get("base_dtype", "fp32") if grid else "fp32"
    grid = [r for r in grid if r.get("base_dtype", "fp32") == first]
    maml = _find(grid, kind="maml")
    full = [r for r in grid if r["kind"] == "melora" and r["method"] == "full" and "error" not in r]
    out: dict = {}
    if maml and "error" not in maml and full:
        best = min(full, key=lambda r: r["extra_mb"])
        plain = _find(full, checkpointing=False, micro_batch=0) or best
        out["full_vs_maml"] = {
            "maml_mb": maml["extra_mb"], "full_best_mb": best["extra_mb"],
            "full_best_config": _label(best), "reduction_best": 1 - best["extra_mb"] / maml["extra_mb"],
            "full_plain_mb": plain["extra_mb"], "reduction_plain": 1 - plain["extra_mb"] / maml["extra_mb"],
            "reduction_worst": 1 - max(r["extra_mb"] for r in full) / maml["extra_mb"],
            "target": REDUCTION_TARGET}
        out["full_vs_maml"]["met"] = out["full_vs_maml"]["reduction_best"] >= REDUCTION_TARGET
    below = []
    for r in full:
        for method in ("none", "diagonal"):
            other = _find(grid, kind="melora", method=method, checkpointing=r["checkpointing"],
                          micro_batch=r["micro_batch"])
            if other and "error" not in other:
                below.append({"config": _label(other), "mb": other["extra_mb"],
                              "full_mb": r["extra_mb"], "below": other["extra_mb"] < r["extra_mb"]})
    if below:
        out["first_order_below_full"] = {"pairs": below, "met": all(p["below"] for p in below)}
    out.update(_k_targets(sweep))
    return out


def _k_targets(sweep: list[dict]) -> dict:
    full = [r for r in sweep if r["kind"] == "melora" and "error" not in r]
    maml = [r for r in sweep if r["kind"] == "maml" and "error" not in r]
    out = {}
    if len(full) > 1:
        values = [r["extra_mb"] for r in full]
        spread = max(values) / min(values) - 1
        out["full_flat_in_k"] = {"spread": spread, "tolerance": FLAT_TOLERANCE,
                                 "met": spread <= FLAT_TOLERANCE}
    if len(maml) > 1:
        values = [r["extra_mb"] for r in sorted(maml, key=lambda r: r["inner_steps"])]
        out["maml_grows_in_k"] = {"growth": values[-1] / values[0],
                                  "met": all(b > a for a, b in zip(values, values[1:]))}
    return out


def _find(rows: list[dict], **match) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def tables(result: dict) -> str:
    """The markdown printed at the end (and pasted into the README)."""
    s, hw = result["setting"], result["hardware"]
    p = result["parameters"]
    lines = [C.header("Memory: one meta-gradient, MELoRA vs full-parameter MAML", hw), "",
             C.describe_setting(s, p) + f" Inner steps K = {result['inner_steps']}, "
             f"inner lr {result['inner_lr']}.",
             f"Memory: {result['memory_method']}. Extra = peak minus after-load; the idle row "
             "is the floor of the method (a child that loads the model and does nothing). "
             "Seconds: one meta-gradient, for orientation only (children share the machine)"
             + _load_text(result.get("load_average")) + ".", "",
             "Base: the frozen weights' dtype (MAML: every weight's). Estimate: "
             "model.estimate_peak_activation_mb, what `keep_graphs`/`checkpointing` `auto` decide on.", "",
             "| Method | Hessian | Checkpointing | Micro-batch | Graphs kept | Base | Weights (MiB) | "
             "Extra peak (MiB) | Estimate (MiB) | Less than MAML | Seconds |",
             "| --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["grid"]:
        maml = _find(result["grid"], kind="maml", base_dtype=r.get("base_dtype", "fp32"))
        lines.append(_grid_row(r, maml.get("extra_mb") if maml else None))
    lines += ["", "Peak memory against inner steps K (MELoRA `full`: no checkpointing, whole set):", "",
              "| K | MAML extra peak (MiB) | MELoRA full extra peak (MiB) | MELoRA / MAML |",
              "| ---: | ---: | ---: | ---: |"]
    for k in sorted({r["inner_steps"] for r in result["k_sweep"]}):
        m = _find(result["k_sweep"], kind="maml", inner_steps=k) or {}
        f = _find(result["k_sweep"], kind="melora", inner_steps=k) or {}
        ratio = f.get("extra_mb", float("nan")) / m.get("extra_mb", float("nan")) if m.get("extra_mb") else None
        lines.append(f"| {k} | {_mb_cell(m)} | {_mb_cell(f)} | {C.fmt(ratio, 3)} |")
    lines += ["", *_target_lines(result["targets"])]
    return "\n".join(lines)


def _load_text(load: dict | None) -> str:
    if not load or not load.get("before"):
        return ""
    return f"; load average {load['before'][0]} before, {load['after'][0]} after"


def _grid_row(r: dict, maml_mb: float | None) -> str:
    name = {"idle": "idle (floor)", "maml": "MAML (all weights, 2nd order)",
            "fomaml": "FOMAML (all weights)", "melora": "MELoRA"}[r["kind"]]
    melora = r["kind"] == "melora"
    less = (f"{100 * (1 - r['extra_mb'] / maml_mb):.1f}%" if melora and maml_mb and "error" not in r
            else "-")
    return (f"| {name} | {r['method'] if melora else '-'} | "
            f"{('on' if r['checkpointing'] else 'off') if melora else '-'} | "
            f"{_mb(r['micro_batch']) if melora else '-'} | {r.get('keep_graphs', 0) if melora else '-'} | "
            f"{r.get('base_dtype', 'fp32')} | {C.fmt(r.get('weights_mb'))} | {_mb_cell(r)} | {C.fmt(r.get('estimate_mb'))} | {less} | "
            f"{C.fmt(r.get('seconds'))} |")


def _mb_cell(r: dict) -> str:
    if "error" in r:
        return "skipped" if r["error"].startswith("skipped") else "killed (OOM?)"
    return C.fmt(r.get("extra_mb"))


def _target_lines(t: dict) -> list[str]:
    lines = ["| Target | Measured | Met |", "| --- | --- | --- |"]
    if "full_vs_maml" in t:
        f = t["full_vs_maml"]
        lines.append(f"| MELoRA full >= {100 * f['target']:.0f}% less peak than MAML | best "
                     f"{100 * f['reduction_best']:.1f}% ({f['full_best_config']}); no checkpointing, "
                     f"whole set {100 * f['reduction_plain']:.1f}%; worst "
                     f"{100 * f['reduction_worst']:.1f}% | {_yes(f['met'])} |")
    if "first_order_below_full" in t:
        pairs = t["first_order_below_full"]["pairs"]
        n = sum(p["below"] for p in pairs)
        # name the pairs that are not below: a tie where the query pass sets every
        # method's peak reads differently from a first-order method using more memory
        rest = "; ".join(f"{p['config']}: {C.fmt(p['mb'])} vs full {C.fmt(p['full_mb'])}"
                         for p in pairs if not p["below"])
        lines.append(f"| MELoRA none/diagonal below full (same checkpointing, micro-batch) | "
                     f"{n} of {len(pairs)} pairs{'; not below: ' + rest if rest else ''} | "
                     f"{_yes(t['first_order_below_full']['met'])} |")
    if "full_flat_in_k" in t:
        f = t["full_flat_in_k"]
        lines.append(f"| MELoRA full flat in K (within {100 * f['tolerance']:.0f}%) | spread "
                     f"{100 * f['spread']:.1f}% | {_yes(f['met'])} |")
    if "maml_grows_in_k" in t:
        g = t["maml_grows_in_k"]
        lines.append(f"| MAML grows with K | x{g['growth']:.2f} from smallest to largest K | "
                     f"{_yes(g['met'])} |")
    return lines


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


# ------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = C.episode_parser(__doc__.splitlines()[0], "gpt2-small", 2, "K of the method grid")
    parser.add_argument("--k-sweep", type=C.parse_ints, default=[1, 2, 4, 8],
                        help="inner steps of the MAML / MELoRA-full sweep ('' = none)")
    parser.add_argument("--methods", type=C.parse_methods, default=list(HESSIAN_METHODS),
                        help="MELoRA Hessian methods of the grid, comma-separated")
    parser.add_argument("--micro-batches", type=C.parse_ints, default=[1, 4, 0],
                        help="micro-batch sizes of the grid (0 = the whole set)")
    parser.add_argument("--no-grid", action="store_true", help="MAML/FOMAML/idle and the K sweep only")
    parser.add_argument("--no-fomaml", action="store_true", help="leave out the FOMAML rows")
    parser.add_argument("--checkpointing", type=_parse_bools, default=[False, True],
                        help="checkpointing settings of the MELoRA grid: off,on")
    parser.add_argument("--keep-graphs", type=C.parse_ints, default=[0],
                        help="MELoRA full rows: step graphs kept from the forward sweep (0..K)")
    parser.add_argument("--base-dtypes", type=_parse_dtypes, default=["fp32"],
                        help="dtypes of the frozen base (MAML: of every weight): fp32,bf16,fp16")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per child (0 = torch's default); see common.py")
    parser.add_argument("--jobs", type=int, default=2,
                        help="child processes at a time (MAML/FOMAML ones one after another)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=C.RESULTS / "memory.json")
    return parser.parse_args(argv)


def _parse_bools(text: str) -> list[bool]:
    words = {"off": False, "on": True}
    values = [w.strip() for w in text.split(",") if w.strip()]
    if not values or any(v not in words for v in values):
        raise argparse.ArgumentTypeError(f"expected off, on or off,on; got {text!r}")
    return [words[v] for v in values]


def _parse_dtypes(text: str) -> list[str]:
    values = [w.strip() for w in text.split(",") if w.strip()]
    if not values or any(v not in ("fp32", "bf16", "fp16") for v in values):
        raise argparse.ArgumentTypeError(f"expected dtypes among fp32, bf16, fp16; got {text!r}")
    return values


def main(argv=None) -> dict:
    return C.run_benchmark(parse_args(argv), run, tables)


if __name__ == "__main__":
    main()
