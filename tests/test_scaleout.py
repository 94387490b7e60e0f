"""Multi-process start-up decisions, the local launcher's process handling, and the deployment recipes' syntax.

The launcher tests run small Python children, not training, so they take a second or two.
"""

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from chipwise.distributed import plan
from chipwise.errors import ChipwiseError
from chipwise.launch import launch

ROOT = Path(__file__).resolve().parents[1]
EXPLICIT = {"CHIPWISE_COORDINATOR_ADDRESS": "10.0.0.1:1234", "CHIPWISE_NUM_PROCESSES": "4",
            "CHIPWISE_PROCESS_ID": "2"}


# ---- when and how jax.distributed.initialize is called -------------------------------------------------------
def test_a_single_process_needs_nothing():
    assert plan({}) is None
    assert plan({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"}) is None  # one task: no runtime
    assert plan({**EXPLICIT, "CHIPWISE_NUM_PROCESSES": "1", "CHIPWISE_PROCESS_ID": "0"}) is None
    assert plan({**EXPLICIT, "CHIPWISE_DISTRIBUTED": "0"}) is None


def test_explicit_settings_are_passed_to_jax():
    kwargs = plan({**EXPLICIT, "CHIPWISE_LOCAL_DEVICE_IDS": "0,1", "CHIPWISE_HEARTBEAT_TIMEOUT": "20"})
    assert kwargs == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
                      "local_device_ids": [0, 1], "initialization_timeout": 300, "heartbeat_timeout_seconds": 20}


@pytest.mark.parametrize("env", [
    {"SLURM_NTASKS": "16", "SLURM_PROCID": "3", "SLURM_JOB_ID": "7"},
    {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_orte_hnp_uri": "1.2.3.4:5"},
    {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "1"},
    {"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"},
    {"CHIPWISE_DISTRIBUTED": "1"},
])
def test_clusters_jax_detects_are_left_to_jax(env):
    assert plan(env) == {"initialization_timeout": 300, "heartbeat_timeout_seconds": 100}


def test_the_local_tpu_placeholder_is_not_a_cluster():
    # process.quiet_libtpu_off_tpu sets TPU_WORKER_HOSTNAMES=localhost on machines without TPUs.
    assert plan({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_SKIP_MDS_QUERY": "1"}) is None


@pytest.mark.parametrize("env, message", [
    ({"CHIPWISE_COORDINATOR_ADDRESS": "h:1", "CHIPWISE_NUM_PROCESSES": "2"}, "CHIPWISE_PROCESS_ID not"),
    ({**EXPLICIT, "CHIPWISE_PROCESS_ID": "4"}, "must lie in 0..CHIPWISE_NUM_PROCESSES-1"),
    ({**EXPLICIT, "CHIPWISE_NUM_PROCESSES": "four"}, "not a whole number"),
    ({**EXPLICIT, "CHIPWISE_LOCAL_DEVICE_IDS": "0;1"}, "comma-separated"),
    ({**EXPLICIT, "NEURON_PJRT_PROCESSES_NUM_DEVICES": "32,32"}, "lists 2 processes but the run has 4"),
    ({**EXPLICIT, "NEURON_PJRT_PROCESSES_NUM_DEVICES": "32,32,32,32", "NEURON_PJRT_PROCESS_INDEX": "1"},
     "differs from this process's id 2"),
])
def test_inconsistent_settings_are_one_line_errors(env, message):
    with pytest.raises(ChipwiseError, match=message):
        plan(env)


# ---- the local launcher --------------------------------------------------------------------------------------
def child(code: str) -> list[str]:
    return [sys.executable, "-c", "import os, sys, signal, time, pathlib\n"
            "i = int(os.environ['CHIPWISE_PROCESS_ID'])\n" + code]


def test_launcher_gives_each_process_its_place_and_reports_the_failure(tmp_path):
    said = []
    code = launch(child(f"d = pathlib.Path(r'{tmp_path}')\n"
                        "(d / f'{i}.tmp').write_text(' '.join(os.environ[k] for k in ('XLA_FLAGS', "
                        "'CHIPWISE_COORDINATOR_ADDRESS', 'CHIPWISE_NUM_PROCESSES')))\n"
                        "(d / f'{i}.tmp').rename(d / str(i))\n"
                        "while not all((d / str(j)).exists() for j in range(3)): time.sleep(0.01)\n"
                        "time.sleep(600) if i == 2 else sys.exit(3 * i)"), processes=3, devices=4,
                  say=said.append)
    assert code == 3  # the process that failed decides, not process 2, stopped by the launcher (143)
    seen = [(tmp_path / str(i)).read_text().split() for i in range(3)]
    # conftest's 8-device flag is replaced, not appended to; all processes meet at one local coordinator.
    assert all(s[0] == "--xla_force_host_platform_device_count=4" and len(s) == 3 for s in seen)
    assert len({s[1] for s in seen}) == 1 and seen[0][1].startswith("127.0.0.1:") and seen[0][2] == "3"
    assert any("process 1 failed (exit code 3)" in m for m in said)


def test_launcher_stops_the_others_when_one_fails(tmp_path):
    said = []
    # Process 0 ignores SIGTERM and would wait forever, like a process stuck in a collective with a dead peer.
    # Process 1 fails only once process 0 ignores SIGTERM: on a loaded machine process 0 may otherwise still be
    # starting when the launcher's SIGTERM arrives, and die of it within the grace period.
    ready = tmp_path / "ignoring"
    code = launch(child("if i == 0:\n"
                        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                        f"    pathlib.Path(r'{ready}').touch()\n"
                        "    time.sleep(600)\n"
                        f"while not pathlib.Path(r'{ready}').exists(): time.sleep(0.01)\n"
                        "sys.exit(5)"), processes=2, devices=1, grace=0.5, say=said.append)
    assert code == 5
    assert any("stopping the other 1 process(es)" in m for m in said)
    assert any("did not stop within 0.5 s; killing them" in m for m in said)


def test_launcher_forwards_signals_and_exits_with_the_worst_code(tmp_path):
    body = ("signal.signal(signal.SIGTERM, lambda *_: sys.exit(143 if i == 0 else 1))\n"
            f"pathlib.Path(r'{tmp_path}', str(i)).touch()\n"
            "time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-m", "chipwise", "launch", "--processes", "2", "--", *child(body)],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / str(i)).exists() for i in range(2)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    assert "failed" not in proc.stderr.read()  # a requested stop is not reported as a failure


def test_launcher_needs_a_command(capsys):
    from chipwise.cli import main

    assert main(["launch", "--processes", "2", "--"]) == 2
    assert "needs a command after --" in capsys.readouterr().err
    assert main(["launch", "--processes", "2", "--", "no-such-command-here"]) == 2
    assert capsys.readouterr().err.strip() == "error: cannot start no-such-command-here: No such file or directory"


# ---- deployment recipes --------------------------------------------------------------------------------------
SCRIPTS = ["deploy/slurm/gpu.sbatch", "deploy/slurm/trainium.sbatch", "deploy/tpu-vm/train.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_recipes_parse_and_train(script):
    path = ROOT / script
    done = subprocess.run([shutil.which("bash") or "/bin/bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert re.search(r'(chipwise|\$CHIPWISE"?) train\b', path.read_text()) and (path.parent / "README.md").is_file()


def test_trainium_recipe_sets_the_neuron_variables():
    text = (ROOT / "deploy/slurm/trainium.sbatch").read_text()
    for name in ("NEURON_RT_ROOT_COMM_ID", "NEURON_PJRT_PROCESSES_NUM_DEVICES", "NEURON_PJRT_PROCESS_INDEX",
                 "CHIPWISE_COORDINATOR_ADDRESS", "CHIPWISE_NUM_PROCESSES", "CHIPWISE_PROCESS_ID"):
        assert f"{name}=" in text


def test_jobset_manifest_has_what_jobset_requires_and_agrees_with_itself():
    doc = yaml.safe_load((ROOT / "deploy/kubernetes/jobset.yaml").read_text())
    assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and doc["kind"] == "JobSet"
    name = doc["metadata"]["name"]
    jobs = doc["spec"]["replicatedJobs"]
    assert jobs and all(j["name"] and j["replicas"] >= 1 for j in jobs)
    processes = sum(j["replicas"] * j["template"]["spec"]["parallelism"] for j in jobs)
    for job in jobs:
        pod = job["template"]["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        assert job["template"]["spec"]["completionMode"] == "Indexed"
        (container,) = pod["containers"]
        assert container["image"] and container["command"][:2] == ["chipwise", "train"]
        env = {e["name"]: e for e in container["env"]}
        assert env["CHIPWISE_NUM_PROCESSES"]["value"] == str(processes)
        index = env["CHIPWISE_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
        assert index == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        # The coordinator is process 0: the first pod of the first job, by JobSet's stable host name.
        host, port = env["CHIPWISE_COORDINATOR_ADDRESS"]["value"].rsplit(":", 1)
        assert host == f"{name}-{jobs[0]['name']}-0-0.{name}" and int(port) > 0
        assert int(port) in [p["containerPort"] for p in container["ports"]]
