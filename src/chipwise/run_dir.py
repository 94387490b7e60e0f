"""The run directory: the only code that knows its layout.

    RUN_DIR/config.yaml        the run's config (written when training starts; a resumed run rewrites it)
    RUN_DIR/tokenizer.json     the run's own copy of its tokenizer (sampling and export read it)
    RUN_DIR/metrics.jsonl      one JSON record per log line or event (train/metrics.py writes it)
    RUN_DIR/tensorboard/       TensorBoard event files
    RUN_DIR/run_info.json      what ran: devices, peak, compile time, provenance (latest invocation)
    RUN_DIR/summary.json       the end-of-run summary (latest invocation)
    RUN_DIR/checkpoints/       Orbax checkpoints (train/checkpoint.py), and checkpoints_set_aside/ beside it

Trainer, sampler, exporter and report ask `RunDir` for these; none of them joins a path itself. Every path goes
through `RunDir._path`, so that run directories in object storage (gs://, s3://) change this module only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import yaml

from chipwise.config import Config, from_dict, to_dict
from chipwise.distributed import barrier, is_leader
from chipwise.errors import ChipwiseError

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
RUN_INFO_FILE = "run_info.json"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"


class RunDir:
    def __init__(self, location: str | Path):
        self.location = Path(location)

    def __str__(self) -> str:
        return str(self.location)

    def _path(self, name: str) -> Path:
        return self.location / name

    # ---- what is there ------------------------------------------------------------------------------------
    def is_run(self) -> bool:
        return self._path(CONFIG_FILE).is_file()

    def require_run(self) -> "RunDir":
        if not self.is_run():
            raise ChipwiseError(f"{self} is not a chipwise run directory (no {CONFIG_FILE})")
        return self

    @property
    def name(self) -> str:
        return self.location.resolve().name

    def same_as(self, other: "RunDir") -> bool:
        return self.location.resolve() == other.location.resolve()

    # ---- starting a run -----------------------------------------------------------------------------------
    def check_prepare(self, resume: bool, overwrite: bool) -> None:
        """Refuse what `prepare` would refuse, changing nothing (so a run that fails its other checks later
        leaves no trace)."""
        if resume:
            if not self.is_run():
                raise ChipwiseError(f"cannot resume: {self} is not a chipwise run directory (no {CONFIG_FILE})")
            return
        if self.location.exists() and any(self.location.iterdir()):
            if not overwrite:
                raise ChipwiseError(f"run directory {self} already exists; pass --resume to continue it, "
                                    f"--overwrite to replace it, or choose another run_dir")
            if not self.is_run():
                raise ChipwiseError(f"refusing to overwrite {self}: it is not a chipwise run directory "
                                    f"(no {CONFIG_FILE}); choose another run_dir")

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Refuse, replace (--overwrite) or keep (--resume) the directory; every process returns once it is ready."""
        self.check_prepare(resume, overwrite)
        if resume:
            return
        barrier("run-dir-checked")  # every process has judged the directory before one of them changes it
        if is_leader():
            if self.location.exists():
                shutil.rmtree(self.location)
            self.location.mkdir(parents=True, exist_ok=True)
        barrier("run-dir-ready")

    # ---- config and tokenizer -----------------------------------------------------------------------------
    def read_config_text(self) -> str:
        return self.require_run()._path(CONFIG_FILE).read_text()

    def read_config(self) -> Config:
        return from_dict(yaml.safe_load(self.read_config_text()))

    def write_config(self, cfg: Config) -> None:
        if is_leader():  # one process writes the run's files
            self._path(CONFIG_FILE).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    @property
    def tokenizer_file(self) -> Path:
        return self._path(TOKENIZER_FILE)

    def write_tokenizer(self, tokenizer) -> None:
        if is_leader():
            tokenizer.save(str(self.tokenizer_file))

    def read_tokenizer(self):
        from chipwise.data.tokenizer import load_tokenizer

        if not self.tokenizer_file.is_file():
            raise ChipwiseError(f"{self} has no {TOKENIZER_FILE}; it is not a complete chipwise run directory")
        return load_tokenizer(str(self.tokenizer_file))

    # ---- records ------------------------------------------------------------------------------------------
    @property
    def metrics_file(self) -> Path:
        return self._path(METRICS_FILE)

    @property
    def tensorboard_dir(self) -> Path:
        return self._path(TENSORBOARD_DIR)

    def read_metrics(self) -> list[dict]:
        """Every complete record of metrics.jsonl, in order."""
        if not self.metrics_file.is_file():
            raise ChipwiseError(f"{self} has no {METRICS_FILE} yet; report on a run that has started training")
        records = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a run killed mid-write
            if isinstance(record, dict) and "step" in record:
                records.append(record)
        return records

    def write_run_info(self, info: dict) -> None:
        self._write_json(RUN_INFO_FILE, info)

    def read_run_info(self) -> dict:
        return self._read_json(RUN_INFO_FILE)

    def write_summary(self, summary: dict) -> None:
        self._write_json(SUMMARY_FILE, summary)

    def read_summary(self) -> dict:
        return self._read_json(SUMMARY_FILE)

    def _write_json(self, name: str, value: dict) -> None:
        if is_leader():
            self._path(name).write_text(json.dumps(value, indent=2))

    def _read_json(self, name: str) -> dict:
        path = self._path(name)
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            return {}  # a run killed mid-write leaves a partial file; report what else there is

    # ---- checkpoints --------------------------------------------------------------------------------------
    def checkpoints(self, keep: int, keep_every: int = 0, log: Callable[[str], None] = print):
        from chipwise.train.checkpoint import Checkpoints

        return Checkpoints(self._path(CHECKPOINT_DIR), keep, keep_every, log=log)

    def latest_params(self, cfg: Config, log: Callable[[str], None] = print):
        """The newest intact checkpoint's parameters (fp32) on this process's first device, with the model's
        graph definition. The restore target is the train step's own state structure (train/step.py), so it
        follows any change to what a checkpoint holds."""
        import jax

        from chipwise.train.step import abstract_state

        state, graphdef = abstract_state(cfg)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
        ckpt = self.checkpoints(keep=cfg.train.keep_checkpoints, log=log)
        try:
            # verified against its checksums; damaged ones are skipped (and left for `train --resume` to set aside)
            found = ckpt.restore_latest(target, move_damaged=False)
        finally:
            ckpt.close()
        if found is None:
            raise ChipwiseError(f"{self} has no checkpoint yet; train it first (chipwise train ...)")
        _, restored, _ = found
        return restored["params"], graphdef
