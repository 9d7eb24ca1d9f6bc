"""``peftjax launch``: one command as N cooperating processes on this machine (jax.distributed).

Each process gets ``JAX_COORDINATOR_ADDRESS`` (process 0 serves it on a free local port),
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, and a ``train`` command gets
``mesh.distributed=true``. Process 0's output passes through; the others' lines are prefixed
with ``[process i]``. When one process fails, the launcher stops the rest (SIGTERM, then
SIGKILL after ``grace_s``) and exits with the failing process's code, naming it; SIGINT/SIGTERM
to the launcher are passed on to every process (a run saves a checkpoint and stops).

Example::

    peftjax launch -n 2 --cpu-devices 4 -- train configs/quickstart.yaml

On several machines there is no launcher: run the same command on every host with the three
variables set (process 0's host in the address), or let JAX read them from the cluster (Cloud
TPU, SLURM).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

# what the processes print when jax.distributed gives up, and what it means
_DIAGNOSES = (
    ("stopped sending heartbeats",
     "another process stopped (killed or crashed), so jax.distributed stopped this one"),
    ("RegisterTask",
     "not every process joined within mesh.init_timeout_s: JAX_NUM_PROCESSES must equal the "
     "number of processes started, and all must reach the coordinator"),
)
# gloo prints a line per connection and collective group (sometimes cut by other output)
_NOISE = ("[Gloo] Rank ", "Expected number of connected peer ranks")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def launch(nproc: int, command: list[str], *, cpu_devices: int | None = None,
           host: str = "127.0.0.1", port: int | None = None, grace_s: float = 10.0,
           out=None) -> int:
    """Runs ``peftjax <command>`` as ``nproc`` processes; returns the exit code (0 when all
    succeed, else the first failing process's code; 128 + n for a signal n)."""
    out = out or sys.stdout
    if nproc < 1:
        raise ValueError(f"-n {nproc}: the number of processes must be >= 1")
    if not command:
        raise ValueError("no command to launch; e.g. peftjax launch -n 2 -- train CONFIG")
    if command[0] == "launch":
        raise ValueError("peftjax launch cannot launch itself")
    command = list(command)
    if command[0] == "train" and not any(a.startswith("mesh.distributed=") for a in command):
        command.append("mesh.distributed=true")
    address = f"{host}:{port or free_port(host)}"
    lock = threading.Lock()
    diagnosis: dict[int, str] = {}
    procs: list[subprocess.Popen] = []

    def pump(i: int, stream) -> None:
        for line in stream:
            if any(noise in line for noise in _NOISE):
                continue
            for marker, meaning in _DIAGNOSES:
                if marker in line:
                    diagnosis.setdefault(i, meaning)
            with lock:
                out.write(line if i == 0 else f"[process {i}] {line}")
                out.flush()

    for i in range(nproc):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(nproc),
                   JAX_PROCESS_ID=str(i), PYTHONUNBUFFERED="1")
        if cpu_devices is not None:
            env["JAX_PLATFORMS"], env["JAX_NUM_CPU_DEVICES"] = "cpu", str(cpu_devices)
        procs.append(subprocess.Popen([sys.executable, "-m", "peftjax.cli", *command], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, bufsize=1))
    pumps = [threading.Thread(target=pump, args=(i, p.stdout), daemon=True)
             for i, p in enumerate(procs)]
    for t in pumps:
        t.start()

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
    except ValueError:  # not the main thread
        pass
    failed, stopped = None, 0
    try:
        while any(p.poll() is None for p in procs):
            # (130: interrupted, a checkpoint saved; the others are saving theirs too)
            bad = [i for i, p in enumerate(procs) if p.poll() not in (None, 0, 130)]
            if bad:
                failed = bad[0]
                break
            time.sleep(0.1)
        if failed is None:
            bad = [i for i, p in enumerate(procs) if p.returncode != 0]
            failed = bad[0] if bad else None
        if failed is not None:
            alive = [p for p in procs if p.poll() is None]
            stopped = len(alive)
            for p in alive:
                p.terminate()
            deadline = time.monotonic() + grace_s
            for p in alive:
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        for t in pumps:
            t.join(timeout=5)
    if failed is None:
        return 0
    code = procs[failed].returncode
    why = diagnosis.get(failed, "")
    print(f"peftjax launch: process {failed} of {nproc} exited with {_describe(code)}"
          + (f" ({why})" if why else "")
          + (f"; stopped the other {stopped} process(es)" if stopped else ""), file=sys.stderr)
    return code if code > 0 else 128 - code
