"""Multi-process start-up on JAX's own distributed runtime (`jax.distributed`), and the few helpers built on it.

`initialize()` runs before anything touches a JAX backend. It decides, from the environment alone:

* explicit settings (any platform, and what `chipwise launch` sets):
    CHIPWISE_COORDINATOR_ADDRESS  host:port where process 0 serves the coordinator
    CHIPWISE_NUM_PROCESSES        number of processes
    CHIPWISE_PROCESS_ID           this process, 0 .. N-1
    CHIPWISE_LOCAL_DEVICE_IDS     optional, e.g. "0,1,2,3": the local accelerators this process drives
* otherwise what JAX detects itself, when it says there is more than one process: Slurm (SLURM_NTASKS),
  Open MPI (OMPI_COMM_WORLD_SIZE), a Kubernetes indexed Job/JobSet (JOB_COMPLETION_INDEX; JAX needs the
  `kubernetes` package there), and Cloud TPU VM slices (TPU_WORKER_HOSTNAMES lists several workers).
* CHIPWISE_DISTRIBUTED=1 always calls `jax.distributed.initialize()` (for environments JAX knows and chipwise
  does not); CHIPWISE_DISTRIBUTED=0 never does.

A single process needs none of it. Timeouts: CHIPWISE_INIT_TIMEOUT (seconds to wait for every process to join,
default 300) and CHIPWISE_HEARTBEAT_TIMEOUT (seconds after which a silent process counts as dead and the
others stop, default 100).

On Trainium the Neuron runtime also reads NEURON_RT_ROOT_COMM_ID, NEURON_PJRT_PROCESSES_NUM_DEVICES and
NEURON_PJRT_PROCESS_INDEX (see docs/scale-out.md); where they are set they are checked against the process
count and id, because a mismatch otherwise shows up as a hang in the first collective.
"""

from __future__ import annotations

import os
import sys

from chipwise.errors import ChipwiseError, TrainingStopped

EXPLICIT = ("CHIPWISE_COORDINATOR_ADDRESS", "CHIPWISE_NUM_PROCESSES", "CHIPWISE_PROCESS_ID")


def _int(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ChipwiseError(f"{name}={env[name]!r} is not a whole number") from None


def _detected(env) -> str | None:
    """The cluster JAX will find, when it holds more than one process; None for a single process."""
    def many(name):
        return name in env and env[name].strip().isdigit() and int(env[name]) > 1

    if many("SLURM_NTASKS") and "SLURM_PROCID" in env:
        return "Slurm"
    if many("OMPI_COMM_WORLD_SIZE") and "OMPI_MCA_orte_hnp_uri" in env:
        return "Open MPI"
    if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
        return "Kubernetes"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or "," in env.get("TPU_PROCESS_ADDRESSES", ""):
        return "Cloud TPU"
    return None


def plan(env=None) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize`, or None where this is a single-process run."""
    env = os.environ if env is None else env
    switch = env.get("CHIPWISE_DISTRIBUTED", "").strip().lower()
    if switch in ("0", "off", "false", "no"):
        return None
    timeouts = {"initialization_timeout": _int(env, "CHIPWISE_INIT_TIMEOUT") if "CHIPWISE_INIT_TIMEOUT" in env
                else 300,
                "heartbeat_timeout_seconds": _int(env, "CHIPWISE_HEARTBEAT_TIMEOUT")
                if "CHIPWISE_HEARTBEAT_TIMEOUT" in env else 100}
    given = [n for n in EXPLICIT if n in env]
    if given:
        missing = [n for n in EXPLICIT if n not in env]
        if missing:
            raise ChipwiseError(f"{', '.join(given)} set but {', '.join(missing)} not; a multi-process run needs "
                                f"all of {', '.join(EXPLICIT)}")
        count, index = _int(env, "CHIPWISE_NUM_PROCESSES"), _int(env, "CHIPWISE_PROCESS_ID")
        if count < 1 or not 0 <= index < count:
            raise ChipwiseError(f"CHIPWISE_PROCESS_ID={index} must lie in 0..CHIPWISE_NUM_PROCESSES-1 "
                                f"(CHIPWISE_NUM_PROCESSES={count})")
        _check_neuron(env, count, index)
        if count == 1:
            return None
        kwargs = {"coordinator_address": env["CHIPWISE_COORDINATOR_ADDRESS"], "num_processes": count,
                  "process_id": index, **timeouts}
        if env.get("CHIPWISE_LOCAL_DEVICE_IDS"):
            try:
                kwargs["local_device_ids"] = [int(x) for x in env["CHIPWISE_LOCAL_DEVICE_IDS"].split(",")]
            except ValueError:
                raise ChipwiseError(f"CHIPWISE_LOCAL_DEVICE_IDS={env['CHIPWISE_LOCAL_DEVICE_IDS']!r} is not a "
                                    f"comma-separated list of device numbers") from None
        return kwargs
    if switch in ("1", "on", "true", "yes") or _detected(env):
        return dict(timeouts)  # JAX fills in the coordinator, count and id from the cluster's variables
    return None


def _check_neuron(env, count: int, index: int) -> None:
    if "NEURON_PJRT_PROCESSES_NUM_DEVICES" in env:
        listed = len(env["NEURON_PJRT_PROCESSES_NUM_DEVICES"].split(","))
        if listed != count:
            raise ChipwiseError(f"NEURON_PJRT_PROCESSES_NUM_DEVICES lists {listed} processes but the run has "
                                f"{count}; give one device count per process")
    if "NEURON_PJRT_PROCESS_INDEX" in env and _int(env, "NEURON_PJRT_PROCESS_INDEX") != index:
        raise ChipwiseError(f"NEURON_PJRT_PROCESS_INDEX={env['NEURON_PJRT_PROCESS_INDEX']} differs from this "
                            f"process's id {index}")


def initialize(env=None) -> None:
    """Join the other processes of this run, if there are any. Must run before any JAX computation."""
    import jax

    kwargs = plan(env)
    if kwargs is None or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes reduce over TCP
    where = kwargs.get("coordinator_address", _detected(os.environ if env is None else env) or "auto-detection")
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ChipwiseError(f"could not join the other processes ({where}): {first[:300]}") from None
    if "process_id" not in kwargs:  # JAX detected the cluster; the Neuron variables must agree with it
        _check_neuron(os.environ if env is None else env, jax.process_count(), jax.process_index())


def is_leader() -> bool:
    """True on the one process that writes the run directory, metrics and console output."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op for one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(value: str, what: str) -> None:
    """Raise on every process unless `value` (e.g. a tokenizer fingerprint) is the same on all of them."""
    import jax

    if jax.process_count() == 1:
        return
    import hashlib

    import numpy as np
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(value.encode()).digest()[:8], dtype=np.int32)
    seen = multihost_utils.process_allgather(digest)
    if not (seen == seen[0]).all():
        raise ChipwiseError(f"the processes disagree about {what}; give every host the same data and settings "
                            f"(a shared CHIPWISE_CACHE, or identical files on each host)")


def run_to_exit(fn):
    """Run `fn()`; in a multi-process run, a process that fails leaves at once with its one-line error.

    A normal exit waits (up to minutes) at JAX's shutdown barrier for processes that may themselves be waiting
    for this one in a collective; leaving straight away lets the launcher or the runtime's heartbeat stop them.
    """
    import jax

    if not jax.distributed.is_initialized():
        return fn()
    try:
        return fn()
    except TrainingStopped as e:  # preempted (every process saved at the same step) or diverged
        code, message = e.exit_code, f"stopped: {e}"
    except ChipwiseError as e:
        code, message = 2, f"error: {e}"
    except KeyboardInterrupt:
        code, message = 130, "interrupted"
    except Exception:  # noqa: BLE001 - a bug: keep its traceback, but do not hang the other processes
        import traceback

        code, message = 1, traceback.format_exc().rstrip()
    print(f"{message} (process {jax.process_index()} of {jax.process_count()})", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def preemption_point(step: int) -> bool:
    """True at the one step where every process saves and stops after any of them got SIGTERM.

    With several processes JAX's preemption service catches SIGTERM, tells every process and agrees on a step
    (the latest any of them has reached, plus one); each process must ask at every step. Saving is a collective,
    so all must save at that same step. A single process is never told here: its SIGTERM acts on it directly.
    """
    import jax

    if jax.process_count() == 1:
        return False
    from jax.experimental import multihost_utils

    return multihost_utils.reached_preemption_sync_point(step)
