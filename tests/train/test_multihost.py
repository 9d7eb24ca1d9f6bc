"""Multi-process training for real: ``peftjax launch`` runs the same ``peftjax train`` as two
processes that join through ``jax.distributed`` on 127.0.0.1 (gloo collectives between them),
each with 4 CPU devices. Checked against one process with 8 devices and with 1 device, through
a SIGKILL of the whole job and a resume, and with one process dying."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.train.test_run import REPO, adapter, cli, tiny_bert, train_losses, write_config  # noqa: F401

STEPS = 6


def peftjax(*args, env=None, timeout=300):
    """``peftjax ARGS`` in a process of its own (output captured)."""
    return subprocess.run([sys.executable, "-m", "peftjax.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout, cwd=REPO)


def config(tmp_path, model, name):
    return write_config(tmp_path, model, name, train={"steps": STEPS, "save_every": 2})


@pytest.fixture(scope="module")
def runs(tiny_bert, tmp_path_factory):  # noqa: F811
    """The same run (LoRA with dropout, so the random streams must agree too) as 2 processes x
    4 devices, SIGKILLed after step 5 (orbax may be mid-write on step 4) and resumed; as
    1 x 8; and as 1 x 1 (this test process): ``{name: (output_dir, stdout, stderr)}``."""
    tmp = tmp_path_factory.mktemp("multihost")
    out = {}
    cfg, d = config(tmp, tiny_bert, "p2x4")
    launch = ("launch", "-n", "2", "--cpu-devices", "4", "--", "train", cfg, "--no-progress")
    killed = peftjax(*launch, env={"PEFTJAX_FAULT_SIGKILL_AT": "5"})
    assert killed.returncode == 128 + signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    out["killed"] = (d, killed.stdout, killed.stderr)
    resumed = peftjax(*launch, "train.resume=true")
    out["2x4"] = (d, resumed.stdout, resumed.stderr)
    cfg, d = config(tmp, tiny_bert, "p1x8")
    eight = peftjax("train", cfg, "--no-progress",
                    env={"JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"})
    out["1x8"] = (d, eight.stdout, eight.stderr)
    cfg, d = config(tmp, tiny_bert, "p1x1")
    import jax
    assert len(jax.devices()) == 1
    one = cli("train", cfg)
    out["1x1"] = (d, one.stdout, one.stderr)
    for name, proc in (("2x4", resumed), ("1x8", eight), ("1x1", one)):
        assert proc.returncode == 0, (name, proc.stdout[-3000:], proc.stderr[-3000:])
    return out


def test_two_processes_train_as_one(runs):
    """2 processes x 4 devices = 1 x 8 = 1 x 1: every step's loss within 1e-6 and the adapter
    within 1e-6 absolute / 1e-5 relative (float32 reductions in another order; measured: loss
    6e-8, adapter 5e-7). Process 0 alone writes the files and prints the run's lines."""
    d2, stdout, _ = runs["2x4"]
    final = {name: dict(train_losses(d)) for name, (d, _, _) in runs.items() if name != "killed"}
    for name in ("1x8", "1x1"):
        assert sorted(final[name]) == list(range(1, STEPS + 1))
        for step, loss in final[name].items():
            assert abs(loss - final["2x4"][step]) <= 1e-6, (name, step)
        a, b = adapter(d2), adapter(runs[name][0])
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert max(float(np.abs(v).max()) for k, v in adapter(d2).items() if "lora_B" in k) > 0
    summary = json.load(open(os.path.join(d2, "summary.json")))
    assert summary["steps"] == STEPS and summary["test"]["targets"] == 160
    assert stdout.count("done: ") == 1 and "[process 1] done" not in stdout
    assert "[process 1] compiled" not in stdout  # process 1 does not report


def test_sigkill_of_the_job_resumes_bit_identically(runs):
    """The job killed with SIGKILL (both processes) and relaunched with train.resume=true: every
    process restores the checkpoint and the data position, and every step it runs again has
    bit-for-bit the loss it had before the kill (one record per step and run: process 0 alone
    writes metrics.jsonl)."""
    d, stdout, _ = runs["2x4"]
    assert "exited with signal SIGKILL" in runs["killed"][2]
    resumed_from = int(stdout.split("resumed from ")[1].split(" ")[0].rsplit("/", 1)[1])
    records = train_losses(d)
    first = dict(records[:5])
    assert sorted(first) == [1, 2, 3, 4, 5]  # steps before the kill
    again = records[5:]
    assert [s for s, _ in again] == list(range(resumed_from + 1, STEPS + 1))
    assert resumed_from in (2, 4)
    for step, loss in again:
        if step in first:
            assert loss == first[step], step
    # the two-process checkpoint restores into one process (its saved config says
    # distributed; eval runs on this process's devices): the run's own test accuracy
    proc = cli("eval", os.path.join(d, "config.yaml"), check=0)
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["step"] == STEPS
    assert result["accuracy"] == json.load(open(os.path.join(d, "summary.json")))["test"]["accuracy"]


def test_a_dead_process_stops_the_others(tiny_bert, tmp_path, unused_port):  # noqa: F811
    """Two processes started by hand (no launcher), process 1 killed by SIGKILL after step 2:
    process 0 stops within mesh.heartbeat_timeout_s (5 s here) plus a margin, with JAX's error
    naming the dead task, instead of waiting forever in a collective."""
    cfg, _ = config(tmp_path, tiny_bert, "dies")
    procs = []
    for pid in (0, 1):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{unused_port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid), "JAX_PLATFORMS": "cpu",
               "JAX_NUM_CPU_DEVICES": "2", "PEFTJAX_FAULT_SIGKILL_AT": "2",
               "PEFTJAX_FAULT_PROCESS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "peftjax.cli", "train", cfg, "--no-progress",
             "mesh.distributed=true", "mesh.heartbeat_timeout_s=5"], env=env, cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        assert procs[1].wait(timeout=240) == -signal.SIGKILL
        died = time.monotonic()
        code = procs[0].wait(timeout=60)
        waited = time.monotonic() - died
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = procs[0].stdout.read()
    print(f"process 0 stopped {waited:.1f} s after process 1 died, exit code {code}")
    assert code != 0
    assert "stopped sending heartbeats" in text or "another task died" in text, text[-2000:]


def test_launcher_reports_the_failing_process(tmp_path):
    """A command that fails in the processes: the launcher names the first failing process and
    exits with its code."""
    proc = peftjax("launch", "-n", "2", "--", "train", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 1
    assert "missing.yaml" in proc.stdout
    assert "peftjax launch: process" in proc.stderr and "of 2 exited with code 1" in proc.stderr
    proc = peftjax("launch", "-n", "0", "--", "train", "x.yaml")
    assert proc.returncode == 1 and "must be >= 1" in proc.stderr


def test_too_few_processes_are_a_bounded_wait(tiny_bert, tmp_path, unused_port):  # noqa: F811
    """JAX_NUM_PROCESSES=2 but only process 0 starts: it says what it waits for and stops after
    mesh.init_timeout_s (JAX aborts the process: DEADLINE_EXCEEDED while registering)."""
    cfg, _ = config(tmp_path, tiny_bert, "alone")
    t0 = time.monotonic()
    proc = peftjax("train", cfg, "--no-progress", "mesh.distributed=true",
                   "mesh.init_timeout_s=3", timeout=120,
                   env={"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{unused_port}",
                        "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
    assert proc.returncode != 0
    assert "process 0 of 2 joining at 127.0.0.1" in proc.stderr
    assert "DEADLINE_EXCEEDED" in proc.stderr
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID not set"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "two",
      "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two' is not an integer"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "2"}, "must be in 0..N-1"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "1"}, "is not host:port"),
    ({}, "JAX is already running in this process"),
])
def test_bad_launch_settings_are_clear_errors(monkeypatch, env, message):
    from peftjax.train import DistributedSetupError, initialize_distributed
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    import jax
    jax.devices()  # this test process's JAX is running
    with pytest.raises(DistributedSetupError, match=message):
        initialize_distributed()


def test_unreachable_coordinator_is_a_clear_error(unused_port):
    from peftjax.train import DistributedSetupError
    from peftjax.train._sharding import _wait_for_coordinator
    t0 = time.monotonic()
    with pytest.raises(DistributedSetupError, match=f"reach the coordinator at 127.0.0.1:"
                       f"{unused_port} within 1 s"):
        _wait_for_coordinator(f"127.0.0.1:{unused_port}", 1)
    assert time.monotonic() - t0 < 10


def test_process_count_without_distributed_is_refused(tiny_bert, tmp_path, monkeypatch):  # noqa: F811
    cfg, _ = config(tmp_path, tiny_bert, "undistributed")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    proc = cli("train", cfg)
    assert proc.returncode == 1 and "set mesh.distributed=true" in proc.stderr


def test_process_shares_of_a_batch_are_disjoint_and_make_the_batch():
    """Each process collates only its rows: the shares of two processes are disjoint, together
    equal the one-process batch (padded to the whole batch's length), also after a restore."""
    from peftjax.data import BatchStream
    rs = np.random.default_rng(0)
    examples = [{"input_ids": rs.integers(1, 100, rs.integers(3, 30)).astype(np.int32),
                 "labels": np.int32(i % 2)} for i in range(64)]
    kw = dict(batch_size=8, buckets=(16, 32), seed=3, pad_id=0, group_by_length=True)
    whole = BatchStream(examples, **kw)
    shares = [BatchStream(examples, **kw, rows=slice(0, 4)),
              BatchStream(examples, **kw, rows=slice(4, 8))]
    for i in range(12):
        if i == 5:  # new streams put back at the position, as a resume does
            shares = [BatchStream(examples, **kw, rows=s.rows) for s in shares]
            for s in shares:
                s.restore(whole.position)
        full = next(whole)
        parts = [next(s) for s in shares]
        for key in full:
            assert np.array_equal(np.concatenate([p[key] for p in parts]), full[key]), (i, key)
        assert shares[0].last_tokens == whole.last_tokens == int(full["attention_mask"].sum())
    with pytest.raises(ValueError, match="not within a batch of 8"):
        BatchStream(examples, **kw, rows=slice(4, 12))


@pytest.fixture
def unused_port():
    from peftjax._launch import free_port
    return free_port()
