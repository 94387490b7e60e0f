"""The `chipwise` command. Bad input becomes one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import logging
import sys

from chipwise import __version__, data_commands, launch, process, run_commands, serve_commands
from chipwise.errors import ChipwiseError, TrainingStopped
from chipwise.plan import cli as plan_cli

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own two-line usage dump becomes our one line
        raise ChipwiseError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="chipwise", description="Pre-train Llama-style models on any accelerator and measure "
                                             "what each chip costs.")
    p.add_argument("--version", action="version", version=f"chipwise {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    t = sub.add_parser("train", help="train a model (see configs/ for examples)")
    t.add_argument("--config", help="YAML file with model/data/train/mesh/hardware sections")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value with a dotted key, e.g. --set train.steps=100 (repeatable)")
    t.add_argument("--resume", metavar="RUN_DIR", nargs="?", const="",
                   help="continue a run from its latest checkpoint (RUN_DIR, or the config's run_dir)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--init-from", metavar="HF_DIR|FILE.gguf",
                   help="start from a local Hugging Face Llama checkpoint or a Llama GGUF file (its model shape "
                        "and tokenizer)")

    i = sub.add_parser("import", help="make a run directory at step 0 from a Hugging Face Llama checkpoint or a "
                                      "Llama GGUF file, to continue pre-training it with train --resume")
    i.add_argument("source", metavar="HF_DIR|FILE.gguf")
    i.add_argument("--out", required=True, metavar="RUN_DIR", help="a new or empty directory")
    i.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a data or train setting of the run, e.g. --set train.steps=1000 (repeatable; the model "
                        "is the checkpoint's; train.lr and train.warmup_steps default to continued pre-training's)")

    s = sub.add_parser("sample", help="generate text from a trained run")
    s.add_argument("--run", required=True, metavar="RUN_DIR")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=100)
    s.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely token")
    s.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    run_commands.add_commands(sub)
    data_commands.add_commands(sub)
    serve_commands.add_commands(sub)
    plan_cli.add_commands(sub)
    launch.add_commands(sub)
    return p


def _train(args) -> int:
    from chipwise.config import apply_overrides, from_dict, load_config, to_dict
    from chipwise.distributed import initialize, run_to_exit
    from chipwise.run_dir import RunDir
    from chipwise.train.loop import Trainer

    if args.resume is not None and args.overwrite:
        raise ChipwiseError("--resume and --overwrite contradict each other; pick one")
    initialize()  # join the run's other processes, if it has any (before anything touches a device)
    if args.init_from is not None:
        if args.resume is not None:
            raise ChipwiseError("--init-from starts a new run; --resume continues one from its own checkpoint")
        from chipwise.hf import init_overrides

        args.overrides = init_overrides(args.init_from) + args.overrides  # the user's --set items come last
    run_dir = args.resume
    if run_dir == "":  # bare --resume: the run named by the config
        run_dir = load_config(args.config, args.overrides).run_dir
    if run_dir is not None and any(o.split("=", 1)[0].strip() in ("model", "model.preset") for o in args.overrides):
        raise ChipwiseError("a resumed run keeps the model it was trained with: --set model / model.preset would be "
                            "ignored; start a new run_dir for another model")
    if run_dir and not args.config:  # a run continues under its own saved config; --set may change e.g. steps
        saved = to_dict(RunDir(run_dir).read_config())
        cfg = _own_tokenizer(from_dict(apply_overrides(saved, args.overrides + [f"run_dir={run_dir}"])),
                             RunDir(run_dir))
    else:  # rerunning a command with --resume uses its config; the checkpoint refuses an incompatible model
        cfg = load_config(args.config, args.overrides + ([f"run_dir={run_dir}"] if run_dir else []))
    if cfg.train.init_from and not run_dir:  # a model --set against the checkpoint fails now, not after compiling
        from chipwise.hf import check_model

        check_model(cfg)
    run_to_exit(lambda: Trainer(cfg, resume=run_dir is not None, overwrite=args.overwrite).run())
    return 0


def _own_tokenizer(cfg, run):
    """A run whose data.tokenizer file is gone (an imported GGUF's lives in ~/.cache, an HF directory may have moved)
    resumes with the run's own copy of it; the checkpoint still refuses a tokenizer it was not trained with."""
    import dataclasses
    import sys
    from pathlib import Path

    given = cfg.data.tokenizer
    if not given or Path(given).expanduser().is_file() or not run.tokenizer_file.is_file():
        return cfg
    print(f"data.tokenizer {given} is gone; using the run's own copy, {run.tokenizer_file}", file=sys.stderr)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(run.tokenizer_file)))


def _import(args) -> int:
    """A run directory whose step-0 checkpoint holds the source's weights and a fresh optimizer state: the
    trainer's own set-up and save (Trainer init_only), so `train --resume` continues as `--init-from` would."""
    from pathlib import Path

    from chipwise.config import load_config
    from chipwise.config_checks import continued_pretraining_defaults
    from chipwise.distributed import initialize, is_leader, run_to_exit
    from chipwise.hf import check_model, init_overrides
    from chipwise.train.loop import Trainer

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ChipwiseError(f"--out {out} is {'not empty' if out.is_dir() else 'a file'}; chipwise import makes a "
                            f"new run directory: choose a new or empty one")
    initialize()
    source = init_overrides(args.source)
    user = args.overrides + [f"run_dir={out}"]  # the user's items come after the defaults
    steps = load_config(None, source + user).train.steps
    cfg = load_config(None, source + continued_pretraining_defaults(steps) + user)
    check_model(cfg)
    summary = run_to_exit(lambda: Trainer(cfg, init_only=True).run())
    loss = summary["first_val_loss"]
    if is_leader():
        print(f"imported {args.source} into {out} at step 0 (validation loss {loss:.4f}); train it with: chipwise "
              f"train --resume {out} (to train.steps={cfg.train.steps}; add --set train.steps=N for another budget)")
    return 0


def _sample(args) -> int:
    from chipwise.sample import sample_from_run

    text = sample_from_run(args.run, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                           args.seed)
    print(text)
    return 0


def run_guarded(parser: argparse.ArgumentParser, handler, argv: list[str] | None = None,
                log_level: int = logging.INFO) -> int:
    """Parse, set up the process (process.py) and run `handler(args)`; user errors become one line and exit 2.

    Shared by the `chipwise` command and the scripts in benchmarks/.
    """
    try:
        args = parser.parse_args(argv)
        process.setup(log_level)  # before JAX starts its threads
        return handler(args)
    except ChipwiseError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingStopped as e:  # preempted (128 + signal number) or diverged; the state is saved
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    commands = {"train": _train, "import": _import, "sample": _sample, **run_commands.COMMANDS,
                **data_commands.COMMANDS, **serve_commands.COMMANDS, **plan_cli.COMMANDS, **launch.COMMANDS}
    return run_guarded(build_parser(), lambda args: commands[args.command](args), argv)


if __name__ == "__main__":
    raise SystemExit(main())
