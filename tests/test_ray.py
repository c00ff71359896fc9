"""`pld sweep --launcher ray` on a real Ray cluster (head and workers in their own processes on 127.0.0.1)."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("ray")

import forked  # noqa: E402
from conftest import free_port  # noqa: E402
from pld_pipeline.sweep import parse_grid, run_sweep  # noqa: E402

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
#: Only a guard against a hang, never a pace to keep: the tests wait for events (the cluster up, a run's first
#: epoch, the sweep's exit). About 10x what an idle 2-core machine takes (cluster start ~10 s, sweep ~2 min).
HANG_S = 1800
#: The cluster and its driver (the sweep) agree on authentication whatever the user's home holds: with a
#: ~/.ray/auth_token (left by any local ray.init) `ray start` turns token auth on, while a driver connecting by
#: address does not, and every call fails "InvalidAuthToken" until the test gives up.
RAY_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def ray_cluster():
    """`ray start --head --block`: a GCS, a raylet and worker processes, as on a cluster's head node, in a process
    session of its own. Yields (address, session id). Stopped by signalling that session only: `ray stop` stops
    every Ray cluster on the machine, another test run's included."""
    port, temp = free_port(), tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit
    log = os.path.join(temp, "start.log")
    with open(log, "w") as out:
        head = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                                 "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
                                 f"--temp-dir={temp}", "--object-store-memory=80000000"], env=RAY_ENV, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    ready, guard = os.path.join(temp, "ray_current_cluster"), time.time() + HANG_S  # written once GCS and raylet run
    while not os.path.exists(ready) and head.poll() is None and time.time() < guard:
        time.sleep(0.1)
    try:
        assert os.path.exists(ready) and head.poll() is None, open(log).read()
        yield f"127.0.0.1:{port}", head.pid
    finally:  # a test cluster has nothing to save: every process of the session at once (workers included)
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait()


def _task_workers(session: int) -> list[int]:
    """This cluster's Ray worker processes executing a run (Ray titles them ray::<task function>); another
    test run's cluster on the same machine is left alone."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::run_task") and os.getsid(int(pid)) == session:
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


@pytest.mark.slow
def test_a_sweep_on_a_ray_cluster_survives_a_killed_worker_and_resumes_the_run(ray_cluster, tiny_data, cache, tmp_path):
    address, session = ray_cluster
    out = tmp_path / "sw"
    settings = ["--set", "epochs=4", "--set", "batch_size=8", "--set", "workers=0", "--set", "device=cpu"]
    sweep = forked.Forked(["sweep", "--data", tiny_data["train"].pattern, "--cache", cache, "--val-data",
                           tiny_data["val"].pattern, "--student", "cifar_resnet8", *settings, "--grid", "loss=ce,kd",
                           "--launcher", "ray", "--ray-address", address, "--cpus-per-run", "2", "--out", str(out)],
                          env=RAY_ENV, stdout=forked.PIPE, stderr=forked.STDOUT)  # the driver, forked
    victim = None
    while victim is None and sweep.poll() is None:  # until a run is caught mid-way, or the sweep has ended
        for name in ("loss=ce", "loss=kd"):  # one run at a time (2 CPUs each): kill the worker after its first epoch
            started = (out / name / "metrics.jsonl").is_file() and not (out / name / "summary.json").is_file()
            workers = _task_workers(session) if started else []
            if len(workers) == 1:
                os.kill(workers[0], signal.SIGKILL)
                victim = name
                break
        time.sleep(0.02)
    try:
        output = sweep.communicate(timeout=HANG_S)[0]  # the sweep's exit, however long a loaded machine takes
    except subprocess.TimeoutExpired:
        sweep.kill()
        pytest.fail(f"the sweep hung for {HANG_S} s: {sweep.communicate()[0]}")
    assert victim is not None, f"no run was caught mid-way: {output}"
    assert sweep.returncode == 0, output
    summary = json.load(open(out / victim / "summary.json"))
    metrics = [json.loads(line) for line in open(out / victim / "metrics.jsonl")]
    assert summary["resumed_from_epoch"] >= 1, "the retried run restarted instead of resuming"
    assert [m["epoch"] for m in metrics] == list(range(4))
    assert all((out / name / "summary.json").is_file() for name in ("loss=ce", "loss=kd"))
    # Live progress on Ray too (off a terminal: one line per finished epoch of each run), each epoch once,
    # the killed and retried run's included.
    for name in ("loss=ce", "loss=kd"):
        reported = [line for line in output.splitlines() if line.startswith(f"{name}: epoch ")]
        assert [line.split()[2] for line in reported] == ["1/4", "2/4", "3/4", "4/4"], output
        assert all("loss " in line and "val top-1 " in line and "ETA " in line for line in reported), reported

    # The interrupted run ends where an uninterrupted one does.
    base = {"data": tiny_data["train"].pattern, "cache": cache, "val_data": tiny_data["val"].pattern,
            "student": "cifar_resnet8", "epochs": 4, "batch_size": 8, "workers": 0, "device": "cpu"}
    torch.set_num_threads(2)
    run_sweep(base, parse_grid([victim]), [], str(tmp_path / "here"))
    ours = load_file(str(out / victim / "last.safetensors"))
    theirs = load_file(str(tmp_path / "here" / victim / "last.safetensors"))
    assert max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours) < 1e-4
    assert json.load(open(tmp_path / "here" / victim / "summary.json"))["last_val_top1"] == summary["last_val_top1"]
