"""The run directory: the only code that knows its layout.

    RUN_DIR/config.yaml        the run's config (written when training starts; a resumed run rewrites it)
    RUN_DIR/tokenizer.json     the run's own copy of its tokenizer (sampling and export read it)
    RUN_DIR/metrics.jsonl      one JSON record per log line or event (train/metrics.py writes it)
    RUN_DIR/tensorboard/       TensorBoard event files
    RUN_DIR/run_info.json      what ran: devices, peak, compile time, provenance (latest invocation)
    RUN_DIR/summary.json       the end-of-run summary (latest invocation)
    RUN_DIR/checkpoints/       Orbax checkpoints (train/checkpoint.py), and checkpoints_set_aside/ beside it
    RUN_DIR/.chipwise-run      the marker: chipwise made this directory (only such a directory is overwritten)
    RUN_DIR/.chipwise-lock     the run that owns the directory now (run_lock.py)

Trainer, sampler, exporter and report ask `RunDir` for these; none of them joins a path itself. Every path goes
through `RunDir._path`. A run directory may be a bucket URI (gs://, s3://; storage.py): its files are objects,
replaced whole. Records that grow (metrics.jsonl, tensorboard/) are written to a local copy and uploaded whole
(`sync_records`: at every checkpoint and at the end), since an object cannot be appended to; a resumed run starts
from the bucket's copy. Readers (sampling, export) get a local copy of the tokenizer.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

from chipwise import __version__, storage
from chipwise.config import Config, from_dict, to_dict
from chipwise.distributed import barrier, is_leader
from chipwise.errors import ChipwiseError
from chipwise.run_lock import RunLock

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_META_FILE = "tokenizer_meta.json"  # a checkpoint's special tokens and chat template (hf.read_tokenizer_meta)
METRICS_FILE = "metrics.jsonl"
RUN_INFO_FILE = "run_info.json"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
SET_ASIDE_DIR = CHECKPOINT_DIR + "_set_aside"
MARKER_FILE = ".chipwise-run"
LOCK_FILE = ".chipwise-lock"
# Everything chipwise writes into a run directory: `--overwrite` removes these and nothing else.
OWN_ENTRIES = {CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_META_FILE, METRICS_FILE, RUN_INFO_FILE, SUMMARY_FILE,
               TENSORBOARD_DIR, CHECKPOINT_DIR, SET_ASIDE_DIR, MARKER_FILE, LOCK_FILE, LOCK_FILE + ".takeover"}


class RunDir:
    def __init__(self, location: str | Path):
        self.remote = storage.is_remote(location)
        self.location = storage.path(location)
        self.lock = RunLock(self._path(LOCK_FILE), str(self.location))
        self._local: Path | None = None  # a remote run's local copies (records being written, the tokenizer)

    def __str__(self) -> str:
        return str(self.location)

    def _path(self, name: str) -> Path:
        return self.location / name

    def _local_copy(self, name: str) -> Path:
        """Where this process keeps its local copy of a remote run's `name`."""
        if self._local is None:
            self._local = Path(tempfile.mkdtemp(prefix="chipwise-run-"))
            atexit.register(shutil.rmtree, self._local, True)
        return self._local / name

    def _replace(self, name: str, text: str) -> None:
        storage.write_whole(self._path(name), text)

    # ---- what is there ------------------------------------------------------------------------------------
    def is_run(self) -> bool:
        return self._path(CONFIG_FILE).is_file()

    def require_run(self) -> "RunDir":
        if not self.is_run():
            if self.remote:
                storage.check_bucket(self.location)  # say so if it is the bucket that is missing or closed
            raise ChipwiseError(f"{self} is not a chipwise run directory (no {CONFIG_FILE})")
        return self

    @property
    def name(self) -> str:
        return self.location.name if self.remote else self.location.resolve().name

    def same_as(self, other: "RunDir") -> bool:
        if self.remote or other.remote:
            return str(self) == str(other)
        return self.location.resolve() == other.location.resolve()

    # ---- starting a run -----------------------------------------------------------------------------------
    def check_prepare(self, resume: bool, overwrite: bool) -> None:
        """Refuse what `prepare` would refuse, changing nothing (so a run that fails its other checks later
        leaves no trace)."""
        if self.remote:
            storage.check_bucket(self.location)  # a missing bucket or missing credentials: one line, now
        if self.location.exists() and not self.location.is_dir():
            raise ChipwiseError(f"run_dir {self} is a file, not a directory; choose another run_dir")
        if resume:
            if not self.is_run():
                raise ChipwiseError(f"cannot resume: {self} is not a chipwise run directory (no {CONFIG_FILE})")
            self.lock.check_free()
            self._check_writable(self.location)
            return
        if self.location.exists() and any(self.location.iterdir()):
            self.lock.check_free()
            if not overwrite:
                raise ChipwiseError(f"run directory {self} already exists; pass --resume to continue it, "
                                    f"--overwrite to replace it, or choose another run_dir")
            self._check_own()
            self._check_writable(self.location)
        elif not self.remote:
            self._check_writable(next(p for p in [self.location, *self.location.parents] if p.exists()))

    def _check_own(self) -> None:
        """--overwrite deletes only a directory chipwise made, and in it only what chipwise wrote."""
        if not self.is_run():
            raise ChipwiseError(f"refusing to overwrite {self}: it is not a chipwise run directory "
                                f"(no {CONFIG_FILE}); choose another run_dir")
        foreign = sorted(p.name for p in self.location.iterdir() if p.name not in OWN_ENTRIES)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ChipwiseError(f"refusing to overwrite {self}: it holds files chipwise did not write ({shown}); "
                                f"move them out or choose another run_dir")
        if not self._path(MARKER_FILE).is_file():
            try:  # a run of a chipwise from before the marker: recognised by its config alone
                self.read_config()
            except ChipwiseError:
                raise ChipwiseError(f"refusing to overwrite {self}: it has no {MARKER_FILE} marker and its "
                                    f"{CONFIG_FILE} is not a chipwise config; choose another run_dir") from None

    def _check_writable(self, directory: Path) -> None:
        if self.remote:  # a bucket's permissions are known only by writing: prepare() says so in one line
            return
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ChipwiseError(f"cannot write to {directory} (permission denied); choose a writable run_dir")

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Refuse, replace (--overwrite) or keep (--resume) the directory, and take its lock (process 0, which
        writes the run's files); every process returns once it is ready. `release` gives the lock back."""
        self.check_prepare(resume, overwrite)
        barrier("run-dir-checked")  # every process has judged the directory before one of them changes it
        if is_leader():
            try:
                self.location.mkdir(parents=True, exist_ok=True)
                self.lock.acquire()  # before anything is removed or written: a second run stops here
                if not resume:
                    for entry in self.location.iterdir():
                        if entry.name in OWN_ENTRIES - {LOCK_FILE, LOCK_FILE + ".takeover"}:
                            storage.remove_tree(entry)
                if not self._path(MARKER_FILE).is_file():
                    self._path(MARKER_FILE).write_text(json.dumps({"chipwise": __version__,
                                                                   "created": time.time()}) + "\n")
            except OSError as e:
                self.lock.release()
                if self.remote:
                    raise storage.bucket_error(e, self.location, "preparing the run directory") from None
                raise ChipwiseError(f"cannot prepare run directory {self}: {e.strerror or e}; choose a writable "
                                    f"run_dir with free space") from None
        barrier("run-dir-ready")

    def release(self) -> None:
        """Give the run directory's lock back (a no-op where this process does not hold it)."""
        self.lock.release()

    def has_damaged_checkpoints(self) -> list[str]:
        """Checkpoints of this run set aside as damaged (train/checkpoint.py names them STEP-damaged[-N])."""
        aside = self._path(SET_ASIDE_DIR)
        return sorted(p.name for p in aside.iterdir() if "-damaged" in p.name) if aside.is_dir() else []

    # ---- config and tokenizer -----------------------------------------------------------------------------
    def read_config_text(self) -> str:
        return self.require_run()._path(CONFIG_FILE).read_text()

    def read_config(self) -> Config:
        return from_dict(self.read_config_dict())

    def read_config_dict(self) -> dict:
        """The saved config as a mapping, or a one-line error saying why it cannot be read."""
        where = self._path(CONFIG_FILE)
        try:
            values = yaml.safe_load(self.read_config_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            why = "not text" if isinstance(e, UnicodeDecodeError) else "not valid YAML"
            raise ChipwiseError(f"{where} is {why}; restore it from a backup (checkpoints/*/meta holds a copy of "
                                f"the config) or start a new run_dir") from None
        except OSError as e:
            raise ChipwiseError(f"cannot read {where}: {e.strerror or e}") from None
        if not isinstance(values, dict):
            raise ChipwiseError(f"{where} does not hold a chipwise config (a mapping of sections, found "
                                f"{type(values).__name__}); restore it or start a new run_dir")
        model = values.get("model")
        if isinstance(model, dict) and "scan_layers" not in model:  # saved before layers were scanned: unrolled
            values["model"] = {**model, "scan_layers": False}
        return values

    def write_config(self, cfg: Config) -> None:
        if is_leader():  # one process writes the run's files, each replaced whole
            self._replace(CONFIG_FILE, yaml.safe_dump(to_dict(cfg), sort_keys=False))

    @property
    def tokenizer_file(self) -> Path:
        """The run's tokenizer.json as a local file (a remote run's is copied here first)."""
        if not self.remote:
            return self._path(TOKENIZER_FILE)
        local = self._local_copy(TOKENIZER_FILE)
        if not local.is_file() and self._path(TOKENIZER_FILE).is_file():
            storage.download(self._path(TOKENIZER_FILE), local)
        return local

    def write_tokenizer(self, tokenizer) -> None:
        if is_leader():
            self._replace(TOKENIZER_FILE, tokenizer.to_str(pretty=True))  # as Tokenizer.save writes it
            if self.remote:
                storage.remove_tree(self._local_copy(TOKENIZER_FILE))  # readers copy the new one

    def write_tokenizer_meta(self, meta: dict) -> None:
        self._write_json(TOKENIZER_META_FILE, meta)

    def read_tokenizer_meta(self) -> dict:
        """The special tokens, chat template and generation ids of the checkpoint the run started from; {} for a
        run trained from scratch (chipwise's own tokens)."""
        return self._read_json(TOKENIZER_META_FILE)

    def read_tokenizer(self):
        from chipwise.data.tokenizer import load_tokenizer

        if not self.tokenizer_file.is_file():
            raise ChipwiseError(f"{self} has no {TOKENIZER_FILE}; it is not a complete chipwise run directory")
        return load_tokenizer(str(self.tokenizer_file))

    # ---- records ------------------------------------------------------------------------------------------
    @property
    def metrics_file(self) -> Path:
        """Where records are appended (a remote run's local copy, uploaded by `sync_records`)."""
        return self._local_copy(METRICS_FILE) if self.remote else self._path(METRICS_FILE)

    @property
    def tensorboard_dir(self) -> Path:
        return self._local_copy(TENSORBOARD_DIR) if self.remote else self._path(TENSORBOARD_DIR)

    def sync_records(self) -> None:
        """Upload a remote run's records (metrics.jsonl, tensorboard/) whole; a no-op for a local run."""
        if self.remote and is_leader():
            storage.upload(self.metrics_file, self._path(METRICS_FILE))
            storage.upload(self.tensorboard_dir, self._path(TENSORBOARD_DIR))

    def repair_metrics(self) -> None:
        """Cut a half-written last line (a run killed mid-write) before more records are appended to it. A remote
        run's records are first copied from the bucket: appending continues from what the bucket holds."""
        if not is_leader():
            return
        if self.remote:
            storage.remove_tree(self.metrics_file)
            storage.remove_tree(self.tensorboard_dir)
            storage.download(self._path(METRICS_FILE), self.metrics_file)
            storage.download(self._path(TENSORBOARD_DIR), self.tensorboard_dir)
        if not self.metrics_file.is_file():
            return
        with open(self.metrics_file, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def read_metrics(self) -> list[dict]:
        """Every complete record of metrics.jsonl, in order."""
        stored = self._path(METRICS_FILE)
        if not stored.is_file():
            raise ChipwiseError(f"{self} has no {METRICS_FILE} yet; report on a run that has started training")
        records = []
        for line in stored.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a run killed mid-write
            if isinstance(record, dict) and "step" in record:
                records.append(record)
        return records

    def write_run_info(self, info: dict, log: Callable[[str], None] = print) -> None:
        self._write_json(RUN_INFO_FILE, info, log)

    def read_run_info(self) -> dict:
        return self._read_json(RUN_INFO_FILE)

    def write_summary(self, summary: dict, log: Callable[[str], None] = print) -> None:
        self._write_json(SUMMARY_FILE, summary, log)

    def read_summary(self) -> dict:
        return self._read_json(SUMMARY_FILE)

    def _write_json(self, name: str, value: dict, log: Callable[[str], None] = print) -> None:
        """Replace RUN_DIR/name in one rename. A full disk costs this record (said in one line), never the run or
        the previous copy."""
        if not is_leader():
            return
        try:
            self._replace(name, json.dumps(value, indent=2))
        except OSError as e:
            log(f"could not write {self._path(name)} ({e.strerror or e}); the previous copy, if any, is kept")

    def _read_json(self, name: str) -> dict:
        path = self._path(name)
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            return {}  # a run killed mid-write leaves a partial file; report what else there is

    # ---- checkpoints --------------------------------------------------------------------------------------
    def checkpoints(self, keep: int, keep_every: int = 0, log: Callable[[str], None] = print,
                    compress: bool = False):
        from chipwise.train.checkpoint import Checkpoints

        return Checkpoints(self._path(CHECKPOINT_DIR), keep, keep_every, log=log, compress=compress)

    def latest_params(self, cfg: Config, log: Callable[[str], None] = print):
        """The newest intact checkpoint's parameters (fp32) on this process's first device, with the model's
        graph definition. The restore target is the train step's own state structure (train/step.py), so it
        follows any change to what a checkpoint holds."""
        import jax

        from chipwise.train.pipeline import map_stacked
        from chipwise.train.step import abstract_state, saved_stage_layout

        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        layouts, graphdefs = [], []

        def target(meta):  # the layer order of the pipeline degree the checkpoint was saved under
            layouts.append(saved_stage_layout(meta, cfg))
            state, graphdef = abstract_state(cfg, layouts[-1])
            graphdefs.append(graphdef)  # the model's, whatever the layout (tracing it again costs seconds)
            return {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                           state["params"])}  # the optimizer's moments (2x more) are not read

        ckpt = self.checkpoints(keep=cfg.train.keep_checkpoints, log=log)
        try:
            # verified against its checksums; damaged ones are skipped (and left for `train --resume` to set aside)
            found = ckpt.restore_latest(target, move_damaged=False, partial=True)
        finally:
            ckpt.close()
        if found is None:
            raise ChipwiseError(f"{self} has no checkpoint yet; train it first (chipwise train ...)")
        _, restored, meta = found
        self._check_tokenizer(meta)
        return map_stacked(restored["params"], layouts[-1].from_slots), graphdefs[-1]  # the plain layer order

    def _check_tokenizer(self, meta: dict) -> None:
        """Token ids mean what the run's tokenizer says only if it is the one the checkpoint was trained with."""
        from chipwise.data.tokenizer import tokenizer_fingerprint

        trained = meta.get("tokenizer_fingerprint")
        if trained and self.tokenizer_file.is_file():
            now = tokenizer_fingerprint(self.read_tokenizer())
            if now != trained:
                raise ChipwiseError(f"{self.tokenizer_file} is not the tokenizer the checkpoint was trained with "
                                    f"(sha256 {now[:12]}, trained with {trained[:12]}); restore the run's own "
                                    f"tokenizer.json")
