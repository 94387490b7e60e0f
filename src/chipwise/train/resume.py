"""Where a run starts: the newest intact checkpoint it can use (resume), pre-trained weights (init_from), or a
fresh initial state; and what a checkpoint records beside the state, so that a resume continues exactly."""

from __future__ import annotations

from typing import Callable

import jax

from chipwise import data
from chipwise.config import Config, to_dict
from chipwise.errors import ChipwiseError
from chipwise.train.accounting import Totals
from chipwise.train.guard import Guard
from chipwise.train.pipeline import relayout, restore_target
from chipwise.train.step import saved_stage_layout, stage_layout

# The data settings that decide which documents and tokens a run trains on: a resume that changes one of them would
# continue the data stream at a position that now means other tokens.
# How block parameters are laid out in a checkpoint (model.py): recorded with every save.
PARAM_LAYOUT = {True: "stacked-layers-v1", False: "unrolled-layers-v1"}
DATA_IDENTITY = ("sources", "text_field", "tokenizer", "val_fraction", "max_documents", "mixture")


def incompatibility(meta: dict, cfg: Config, tokenizer_fp: str, corpus_fp: str) -> str | None:
    """What makes a checkpoint unusable under `cfg`, in a few words; None if nothing does.

    The model's shape and vocabulary, the data's identity (DATA_IDENTITY, the corpus and the tokenizer) must
    match; training length, schedule, logging and mesh may change (the data-stream settings are checked by the
    data iterator itself).
    """
    now = to_dict(cfg)
    saved_model = (meta.get("config") or {}).get("model")
    if saved_model is not None and saved_model.get("scan_layers", False) != cfg.model.scanned:
        layout = "stacked (scanned)" if saved_model.get("scan_layers", False) else "unrolled"
        return (f"checkpoint holds {layout} layers, config has model.scan_layers={cfg.model.scanned}; resume "
                f"with --set model.scan_layers={str(not cfg.model.scanned).lower()}, or convert: chipwise export "
                f"--run RUN --out HF_DIR, then chipwise train --init-from HF_DIR (a fresh optimizer state)")
    saved = meta.get("config") or {}
    for key, value in now["model"].items():  # checkpoints of older versions lack the config: Orbax checks shapes
        if key in saved.get("model", {}) and saved["model"][key] != value:
            return f"checkpoint has model.{key}={saved['model'][key]}, config has {value}"
    keys = [key for key in DATA_IDENTITY if key in saved.get("data", {}) and saved["data"][key] != now["data"][key]]
    fp = meta.get("tokenizer_fingerprint")
    if fp == tokenizer_fp:  # the same tokenizer.json at another path (cli._own_tokenizer's copy) is no change
        keys = [key for key in keys if key != "tokenizer"]
    changed = [f"data.{key} was {saved['data'][key]!r}, is now {now['data'][key]!r}" for key in keys]
    if fp != tokenizer_fp:
        return (f"checkpoint was trained with tokenizer {str(fp)[:12]}, the data now gives tokenizer "
                f"{tokenizer_fp[:12]} (sha256 of tokenizer.json)" + (f" because {'; '.join(changed)}" if changed
                                                                      else ""))
    if changed:
        return f"{'; '.join(changed)}: the checkpoint's data position would mean other tokens"
    corpus = meta.get("corpus_fingerprint")
    if corpus is not None and corpus != corpus_fp:
        return (f"the documents under data.sources changed since the checkpoint (corpus {corpus[:12]}, now "
                f"{corpus_fp[:12]}), so its data position would mean other tokens")
    return None


def checkpoint_meta(cfg: Config, step: int, iterator, prepared: data.PreparedData, guard: Guard,
                    totals: dict) -> dict:
    """The JSON saved with every checkpoint: enough to check a resume's config, continue the data stream, the
    divergence guard's counts and the run's totals."""
    return {"step": step, "data_iterator": iterator.get_state(), "config": to_dict(cfg),
            "tokenizer_fingerprint": prepared.tokenizer_fingerprint,
            "corpus_fingerprint": prepared.corpus_fingerprint, "guard": guard.state(), "totals": totals,
            "param_layout": PARAM_LAYOUT[cfg.model.scanned]}


def _target(meta: dict, cfg: Config, abstract_state):
    """The restore target for a checkpoint with `meta`: this run's state, its layers in the checkpoint's order."""
    saved = saved_stage_layout(meta, cfg)
    return abstract_state if saved == stage_layout(cfg) else restore_target(abstract_state, saved)


def in_this_layout(state, meta: dict, cfg: Config, steps):
    """A restored state with its stacked layers moved from the checkpoint's pipeline stages to this run's."""
    saved, current = saved_stage_layout(meta, cfg), stage_layout(cfg)
    if saved == current:
        return state
    return jax.jit(lambda s: relayout(s, saved, current), out_shardings=steps.state_shardings)(state)


def restore_step(ckpt, step: int, cfg: Config, steps, abstract_state):
    """(state, meta) of checkpoint `step`, in this run's layout (a rollback may reach one saved under another)."""
    meta = ckpt.read_meta(step)
    return in_this_layout(ckpt.restore(step, _target(meta, cfg, abstract_state)), meta, cfg, steps), meta


def fresh_state(cfg: Config, steps):
    """The state at step 0: random weights, or those of train.init_from (pre-trained, Hugging Face Llama), and a
    fresh optimizer state."""
    if not cfg.train.init_from:
        return steps.init()
    from chipwise.hf import initial_params

    return steps.init(initial_params(cfg, steps.state_shardings["params"]))  # no random weights drawn to discard


def initial_state(cfg: Config, run_dir, prepared: data.PreparedData, steps, ckpt, abstract_state, resume: bool,
                  log: Callable[[str], None]):
    """(state, start step, data iterator, guard, totals so far, whether the state is a checkpoint's) to train
    from."""
    t = cfg.train
    iterator = data.make_train_iterator(prepared, t.seq_len, t.batch_size, t.seed, jax.process_index(),
                                        jax.process_count(), cfg.data.worker_threads)
    found = None
    if resume:
        def check(meta):  # before any array is read or any file of the run is written
            problem = incompatibility(meta, cfg, prepared.tokenizer_fingerprint, prepared.corpus_fingerprint)
            if problem:
                raise ChipwiseError(f"cannot resume {run_dir}: {problem}; resume with the settings it "
                                    f"was trained with, or start a new run_dir")
            if meta["step"] >= t.steps:  # nothing to train: refuse before the config or summary is rewritten
                raise ChipwiseError(f"{run_dir} has already trained to step {meta['step']} and train.steps is "
                                    f"{t.steps}; to train further, resume with --set train.steps=N (N > "
                                    f"{meta['step']})")
            iterator.set_state(meta["data_iterator"])  # refuses a changed seq_len, batch size or seed

        found = ckpt.restore_latest(lambda meta: _target(meta, cfg, abstract_state), check)
        if found is not None:
            step, state, meta = found
            found = step, in_this_layout(state, meta, cfg, steps), meta
    if found is None:
        damaged = run_dir.has_damaged_checkpoints() if resume else []
        if damaged:  # a run that has trained never silently starts again from step 0
            raise ChipwiseError(f"cannot resume {run_dir}: it has no usable checkpoint (damaged ones were set aside: "
                                f"{', '.join(damaged)}); start a new run_dir, or --overwrite to train it from "
                                f"step 0 again")
        if resume:
            log(f"no checkpoint in {run_dir}; starting from step 0")
        state = fresh_state(cfg, steps)
        if t.init_from:
            log(f"initialised from {t.init_from}")
        return state, 0, iterator, Guard(), Totals(), False
    step, state, meta = found
    log(f"resumed from step {step}")
    return state, step, iterator, Guard(**meta.get("guard", {})), Totals.from_state(meta.get("totals")), True
