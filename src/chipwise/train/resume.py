"""Where a run starts: the newest intact checkpoint it can use (resume), pre-trained weights (init_from), or a
fresh initial state; and what a checkpoint records beside the state, so that a resume continues exactly."""

from __future__ import annotations

from typing import Callable

import jax

from chipwise import data
from chipwise.config import Config, to_dict
from chipwise.errors import ChipwiseError
from chipwise.train.guard import Guard


def incompatibility(meta: dict, cfg: Config, tokenizer_fp: str) -> str | None:
    """What makes a checkpoint unusable under `cfg`, in a few words; None if nothing does.

    The model's shape and vocabulary and the tokenizer must match; training length, schedule, logging and mesh
    may change (the data-stream settings are checked by the data iterator itself).
    """
    saved = (meta.get("config") or {}).get("model")
    if saved is not None:  # checkpoints of older versions lack it; Orbax's shape check then has the last word
        now = to_dict(cfg)["model"]
        for key, value in now.items():
            if key in saved and saved[key] != value:
                return f"checkpoint has model.{key}={saved[key]}, config has {value}"
    fp = meta.get("tokenizer_fingerprint")
    if fp != tokenizer_fp:
        return (f"checkpoint was trained with tokenizer {str(fp)[:12]}, the data now gives tokenizer "
                f"{tokenizer_fp[:12]} (sha256 of tokenizer.json)")
    return None


def checkpoint_meta(cfg: Config, step: int, iterator, tokenizer_fp: str, guard: Guard) -> dict:
    """The JSON saved with every checkpoint: enough to check a resume's config and continue the data stream."""
    return {"step": step, "data_iterator": iterator.get_state(), "config": to_dict(cfg),
            "tokenizer_fingerprint": tokenizer_fp, "guard": guard.state()}


def initial_state(cfg: Config, run_dir, prepared: data.PreparedData, steps, ckpt, abstract_state, resume: bool,
                  log: Callable[[str], None]):
    """(state, start step, data iterator, guard) to train from."""
    t = cfg.train
    iterator = data.make_train_iterator(prepared, t.seq_len, t.batch_size, t.seed, jax.process_index(),
                                        jax.process_count(), cfg.data.worker_threads)
    found = None
    if resume:
        def check(meta):  # before any array is read or any file of the run is written
            problem = incompatibility(meta, cfg, prepared.tokenizer_fingerprint)
            if problem:
                raise ChipwiseError(f"cannot resume {run_dir}: {problem}; resume with the settings it "
                                    f"was trained with, or start a new run_dir")
            iterator.set_state(meta["data_iterator"])  # refuses a changed seq_len, batch size or seed

        found = ckpt.restore_latest(abstract_state, check)
    if found is None:
        if resume:
            log(f"no checkpoint in {run_dir}; starting from step 0")
        state = steps.init()
        if t.init_from:  # pre-trained weights (Hugging Face Llama), a fresh optimizer state
            from chipwise.hf import initial_params

            state["params"] = initial_params(cfg, steps.state_shardings["params"])
            log(f"initialised from {t.init_from}")
        return state, 0, iterator, Guard()
    step, state, meta = found
    log(f"resumed from step {step}")
    return state, step, iterator, Guard(**meta.get("guard", {}))
