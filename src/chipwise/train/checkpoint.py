"""Orbax checkpoints: the sharded train state plus a JSON record (data position, config, fingerprints).

Saves are asynchronous (Orbax writes in the background while training goes on) and Orbax only exposes a step
once it is completely written. Restores read straight into the run's current shardings, so the mesh may change.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from chipwise.errors import ChipwiseError


class Checkpoints:
    def __init__(self, directory: Path, keep: int, save_every: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                               enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                             item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, abstract_state) -> tuple[dict, dict]:
        """`abstract_state`: ShapeDtypeStructs carrying the target shardings."""
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ChipwiseError(f"checkpoint at step {step} does not match this run's model "
                                f"({first[:200]}); resume with the config it was saved with") from None
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
