"""MELoRA command line: parse flags, load and validate the config, dispatch a mode.

    python main.py --mode train --model gpt2-small --lora_rank 8
    python main.py --mode train --resume results/melora/checkpoints/checkpoint_iter_500.pt
    python main.py --mode evaluate --checkpoint results/melora/checkpoints/checkpoint_iter_1000.pt
    python main.py --mode full --experiment_name my_experiment
    python main.py --mode full --resume results/my_experiment/checkpoints/checkpoint_iter_500.pt
    python main.py --mode adapt --checkpoint CKPT --support support.csv --predict texts.csv
    python main.py --mode export --checkpoint CKPT --output_dir adapter/
    torchrun --nproc_per_node 4 main.py --mode train --meta_batch_size 8   # one process per GPU

Every default lives in config.yml: a flag overrides the key it names only when given,
and `--set section.key=value` reaches any other key. A problem with the input is printed
as one `error: ...` paragraph on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import signal
import sys
import threading
import warnings

import torch

import config
import runs
import utils
from utils import UserError

# Flag -> the config key it overrides.
FLAG_KEYS = {
    "model": "models.selected_model",
    "lora_rank": "lora.default_rank",
    "meta_batch_size": "meta_learning.default_meta_batch_size",
    "inner_steps": "meta_learning.inner.default_num_steps",
    "inner_lr": "meta_learning.inner.default_lr",
    "outer_lr": "meta_learning.outer.default_lr",
    "n_way": "tasks.n_way",
    "k_shot": "tasks.k_shot",
    "q_query": "tasks.q_query",
    "num_iterations": "meta_learning.num_iterations",
    "synthetic_only": "datasets.synthetic_only",
    "experiment_name": "training.experiment_name",
    "seed": "training.seed",
    "device": "training.device",
    "output_dir": "training.output_dir",
}
# What --mode evaluate writes into a run folder: --overwrite sets these aside, not the run.
EVALUATION_OUTPUTS = ("results.json", "meta_test_episodes.json", "evaluation")
# What --mode adapt writes into a run folder: a folder holding the first two is refused
# without --overwrite, which sets all of them aside (put back if the new adapt fails).
ADAPT_PROTECTED = ("predictions.csv", "adapted")
ADAPT_OUTPUTS = ADAPT_PROTECTED + ("metrics.json", "confusion_matrix.png")
# Errors of the machine, not the code: one `error:` line instead of a traceback.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one `error: ...` paragraph (exit 2), like a UserError."""

    def error(self, message: str):
        raise UserError(f"{message} (see python main.py --help)")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; every config flag defaults to None (config.yml decides)."""
    p = _Parser(description="MELoRA: memory-efficient LoRA meta-learning.",
                epilog="Any other config key: --set section.key=value (repeatable).")
    p.add_argument("--mode", choices=("train", "evaluate", "full", "adapt", "export"), default="train",
                   help="train (default), evaluate a checkpoint, full (train, evaluate, analyse), "
                        "adapt a checkpoint to --support and label --predict, or export a "
                        "checkpoint as a PEFT adapter into --output_dir")
    p.add_argument("--config", help="a YAML file overriding config.yml (may hold only some keys)")
    p.add_argument("--model", help="registered model name or local model directory")
    p.add_argument("--lora_rank", type=int, help="LoRA rank r (lora.default_rank)")
    p.add_argument("--meta_batch_size", type=int, help="tasks per meta-update")
    p.add_argument("--inner_steps", type=int, help="inner-loop adaptation steps K (0: no inner loop)")
    p.add_argument("--num_iterations", type=int, help="meta-iterations")
    p.add_argument("--inner_lr", type=float, help="inner-loop learning rate (meta_learning.inner.default_lr)")
    p.add_argument("--outer_lr", type=float, help="outer Adam learning rate (meta_learning.outer.default_lr)")
    p.add_argument("--n_way", type=int, help="classes per episode (tasks.n_way)")
    p.add_argument("--k_shot", type=int, help="support examples per class (tasks.k_shot)")
    p.add_argument("--q_query", type=int, help="query examples per class (tasks.q_query)")
    p.add_argument("--synthetic_only", action="store_true", default=None,
                   help="use only synthetic tasks (offline)")
    p.add_argument("--seed", type=int, help="training.seed")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--output_dir", help="parent folder of run folders")
    p.add_argument("--experiment_name", help="run folder name under --output_dir")
    p.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue training exactly from a checkpoint (with --mode full: then "
                        "evaluate and report into the same run folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--checkpoint", help="checkpoint to evaluate, adapt or export")
    p.add_argument("--support", help="labelled examples of your task (--mode adapt; csv/json/jsonl/parquet)")
    p.add_argument("--predict", help="texts to label (--mode adapt; csv/json/jsonl/parquet)")
    p.add_argument("--skip_baselines", action="store_true", help="evaluate MELoRA only")
    p.add_argument("--hyperparameter_search", action="store_true",
                   help="Bayesian search before the full experiment (--mode full)")
    p.add_argument("--dataset", help="hub name or local file for meta-training")
    p.add_argument("--eval_dataset", help="hub name or local file for meta-testing")
    p.add_argument("--text_column", help="text column of --dataset/--eval_dataset")
    p.add_argument("--label_column", help="label column of --dataset/--eval_dataset")
    p.add_argument("--verbose", action="store_true",
                   help="also show third-party progress bars and logs (transformers, datasets)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set lora.alpha=32 (repeatable)")
    return p


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flag combinations that make no sense, before any work is done."""
    if args.resume and args.overwrite:
        raise UserError("--resume continues a run folder and --overwrite replaces it; pass one")
    if args.resume and args.mode not in ("train", "full"):
        raise UserError(f"--resume continues training (--mode train) or a full run (--mode full), "
                        f"not --mode {args.mode}")
    if args.resume and args.hyperparameter_search:
        raise UserError("--resume continues a run whose checkpoint already holds the searched "
                        "values; drop --hyperparameter_search")
    if args.checkpoint and args.mode not in ("evaluate", "adapt", "export"):
        raise UserError(f"--checkpoint names the checkpoint to evaluate (--mode evaluate), "
                        f"adapt or export; with --mode {args.mode} use --resume to continue training")
    if (args.support or args.predict) and args.mode != "adapt":
        raise UserError("--support and --predict are the files of --mode adapt")
    if args.skip_baselines and args.mode == "train":
        raise UserError("--skip_baselines applies to --mode evaluate or full, not train")
    if args.hyperparameter_search and args.mode != "full":
        raise UserError("--hyperparameter_search applies to --mode full only")


def config_overrides(args: argparse.Namespace) -> dict:
    """Flags that were given, as `{"section.key": value}`; `--set` comes last and wins."""
    from dataset_loader import cli_dataset_overrides
    out = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items()
           if getattr(args, flag) is not None}
    if args.mode == "adapt":  # the columns of --support/--predict
        out.update({f"adapt.{flag}": getattr(args, flag) for flag in ("text_column", "label_column")
                    if getattr(args, flag) is not None})
    else:
        out.update(cli_dataset_overrides(args.dataset, args.eval_dataset, args.text_column,
                                         args.label_column))
    out.update(config.parse_overrides(args.overrides))
    return out


def load(args: argparse.Namespace) -> config.Config:
    """The validated config; a resumed run starts from its checkpoint's config."""
    overrides = config_overrides(args)
    if args.resume:
        import trainer
        cfg = trainer.resume_config(args.resume, args.config, overrides)
    else:
        cfg = config.load_config(args.config, overrides)  # bad YAML, types, ranges: at once
    import experiment  # noqa: F401  (imports every module that owns config values: config.RULES)
    config.check(cfg)  # the values the owning modules allow (model names, methods, ...)
    return cfg


def dispatch(args: argparse.Namespace, cfg: config.Config) -> dict:
    """Run the chosen mode in its run folder (under torchrun: on every rank)."""
    training = cfg.training
    if utils.init_distributed(training.device) and args.mode == "full":
        raise UserError("--mode full runs in one process; under torchrun run --mode train, "
                        "then --mode evaluate (or run --mode full with python main.py)")
    named = {"config_file": args.config, "explicit_overrides": config_overrides(args)}  # the user's keys
    if args.mode == "export":  # writes --output_dir itself, no run folder
        import adapt
        return {"exported": str(adapt.run_export(cfg, args.checkpoint, args.output_dir, args.overwrite,
                                                 **named))}
    utils.resolve_device(training.device)  # cheap checks before any folder is touched
    job = None
    if args.mode == "adapt":  # every input read and checked before the run folder exists
        import adapt
        job = adapt.prepare(cfg, args.checkpoint, args.support, args.predict, **named)
    else:
        from dataset_loader import check_sources
        check_sources(cfg.datasets)
    # Rank 0 opens the run folder; the others wait for it (and share its refusal).
    outputs = {"evaluate": (("results.json",), EVALUATION_OUTPUTS),
               "adapt": (ADAPT_PROTECTED, ADAPT_OUTPUTS)}.get(args.mode, ((), ()))
    folder = utils.run_on_main(runs.open_run_dir, training.output_dir,
                               training.experiment_name, overwrite=args.overwrite,
                               resume=bool(args.resume) or args.mode in ("evaluate", "adapt"),
                               protect=outputs[0], replace=outputs[1],
                               checkpoint=args.resume, reserved=(_token_cache(cfg),))
    utils.setup_logging(log_file=folder.path / f"{args.mode}.log")
    ok = False
    try:
        result = _run_mode(args, cfg, folder.path, job, named)
        ok = True
        return result
    except KeyboardInterrupt as e:  # a second signal: stopped at once, maybe before a checkpoint
        if isinstance(e, utils.RunInterrupted) and args.mode != "full":
            raise
        raise _stopped_at_once(args, folder.path, e) from None
    finally:
        # A failed start (no checkpoint or results yet, whatever the error) leaves no
        # folder that would make the corrected command a refused rerun, and gets back
        # what --overwrite set aside; a started run deletes it.
        if utils.is_main_process():
            runs.close_run_dir(folder, ok)


def _token_cache(cfg: config.Config):
    """The tokenisation cache folder, which no run folder may be."""
    from pathlib import Path
    return cfg.datasets.cache_dir or Path(cfg.training.output_dir) / "cache"


def _stopped_at_once(args: argparse.Namespace, run_dir, e: KeyboardInterrupt) -> utils.RunInterrupted:
    """What a signal that stopped at once left behind, truthfully: a checkpoint or nothing,
    and a command that continues (every hint printed here is a command that works)."""
    signum = getattr(e, "signum", None) or (e.args[0] if e.args and isinstance(e.args[0], int)
                                            else signal.SIGINT)
    name = signal.Signals(signum).name
    if args.mode == "evaluate":
        return utils.RunInterrupted(f"{name} stopped the evaluation; results.json was not "
                                    "written: run the command again", signum)
    if args.mode == "adapt":  # a stopped adapt keeps no folder: nothing to resume
        return utils.RunInterrupted(f"{name} stopped the adaptation; nothing was kept: run "
                                    "the command again", signum)
    import trainer
    last = trainer.latest_checkpoint(run_dir)
    if last is None:
        return utils.RunInterrupted(f"{name} stopped the run before its first checkpoint: "
                                    "nothing to resume and no run folder kept; run the "
                                    "command again", signum)
    return utils.RunInterrupted(f"{name} stopped the run; the last complete checkpoint is "
                                f"{last}. Continue with: {trainer.resume_command(last, mode_args(args))}",
                                signum)


def mode_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The flags before `--resume` in the command that continues this run."""
    if args.mode != "full":
        return ()
    return ("--mode", "full") + (("--skip_baselines",) if args.skip_baselines else ())


def _raise_on_sigterm(signum, frame):
    """SIGTERM outside training's own handling stops like Ctrl-C, so the run folder is
    settled (a failed start leaves none) instead of the process dying mid-way."""
    raise KeyboardInterrupt(signum)


def _run_mode(args: argparse.Namespace, cfg: config.Config, run_dir, job=None, named=None) -> dict:
    """`named`: the `--config` file and the flags the user gave (config.checkpoint_config)."""
    named = named or {}
    # Heavy modules are imported here, after the input was checked.
    if args.mode == "adapt":
        import adapt
        return adapt.run_adapt(job, run_dir)
    if args.mode == "train":
        import trainer
        return trainer.run_training(cfg, run_dir, resume=args.resume, **named)
    if args.mode == "evaluate":
        import evaluation
        return evaluation.run_evaluation(cfg, args.checkpoint, args.skip_baselines, run_dir, **named)
    import experiment
    more = {"resume": args.resume, "mode_args": mode_args(args), **named} if args.resume else \
        {"mode_args": mode_args(args)}
    return experiment.run_full(cfg, run_dir, args.hyperparameter_search, args.skip_baselines, **more)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Parse, validate, dispatch; a UserError becomes `error: ...` and exit status 2."""
    warnings.formatwarning = _format_warning
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if on_main_thread else None
    orderly = False  # the mode returned: every rank leaves the process group together
    try:
        args = build_parser().parse_args(argv)
        utils.quiet_third_party(args.verbose)  # before transformers/datasets are imported
        check_flags(args)
        dispatch(args, load(args))
        orderly = True
    except UserError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except utils.RunInterrupted as e:  # SIGINT/SIGTERM: the message says what was kept
        print(f"interrupted: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt as e:  # before the run folder was opened
        print("interrupted before anything was written", file=sys.stderr)
        return 128 + (e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT)
    except OSError as e:  # disk full, read-only or forbidden, wherever it was hit
        if e.errno not in DISK_ERRNOS:
            raise
        print(f"error: {e.strerror}: {e.filename or 'a file'}; free disk space or fix its "
              "permissions, or pass another --output_dir", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:  # outside the training loop's own handling
        import trainer  # loaded already: the memory ran out in a mode's work
        print(f"error: out of memory ({str(e).splitlines()[0]}); {trainer.OOM_ADVICE}",
              file=sys.stderr)
        return 2
    except RuntimeError as e:  # under torchrun: a peer rank is gone (one line, not a trace)
        reason = utils.lost_peer(e)
        if reason is None:
            raise
        print(f"error: {reason}", file=sys.stderr)
        return 1
    finally:
        utils.close_distributed(orderly)
        if on_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
