"""A real Slurm cluster on this machine, shared by the tests that need one (tests/conftest.py).

``cluster`` (session scope) brings up a throw-away cluster of 2 nodes with
scripts/local_slurm.sh (its own directory, ports and node names) and takes it
down at the end; ``slurm`` is the cluster for one test, which scancels every
job the test recorded in ``cluster.jobs``. A missing Slurm is an error, not a
skip (.ci/run installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import train_fixtures as tf

from liquid_dist.parallel import free_port

LOCAL_SLURM = tf.REPO / "scripts" / "local_slurm.sh"
SLURM_COMMANDS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo", "slurmctld",
                  "slurmd", "munged", "mungekey")


@dataclass
class Cluster:
    conf: Path
    nodes: list[str]
    jobs: list[int | str] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return tf.env(SLURM_CONF=str(self.conf), **extra)

    def cmd(self, *args: str, timeout: float = 30) -> str:
        proc = subprocess.run(list(args), env=self.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{' '.join(args)}: {proc.stdout}"
        return proc.stdout


def _free_port_run(n: int) -> int:
    """A port p with p..p+n-1 all free (slurmctld, then one per slurmd)."""
    for _ in range(50):
        p = free_port()
        if p + n < 65536 and all(_port_free(p + i) for i in range(n)):
            return p
    raise RuntimeError(f"no {n} consecutive free ports found")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        pytest.fail(f"the real-Slurm tests need {', '.join(missing)}: as root, apt-get install "
                    "-y slurm-wlm munge (.ci/run does)", pytrace=False)
    directory = tmp_path_factory.mktemp("local_slurm") / "cluster"
    prefix = f"lq{os.getpid()}n"
    env = dict(os.environ, LOCAL_SLURM_DIR=str(directory), NODES="2", NODE_PREFIX=prefix,
               LOCAL_SLURM_PORT=str(_free_port_run(3)))
    up = subprocess.run(["bash", str(LOCAL_SLURM), "up"], env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, timeout=120)
    try:
        assert up.returncode == 0, up.stdout
        yield Cluster(conf=directory / "slurm.conf", nodes=[f"{prefix}1", f"{prefix}2"])
    finally:
        down = subprocess.run(["bash", str(LOCAL_SLURM), "down"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=120)
        assert down.returncode == 0, down.stdout
        assert prefix not in Path("/etc/hosts").read_text()


@pytest.fixture
def slurm(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster; the jobs a test submitted are scancelled (and gone) when it ends."""
    yield cluster
    jobs = [str(j) for j in cluster.jobs]
    cluster.jobs.clear()
    if jobs:
        subprocess.run(["scancel", "--full", "--signal=KILL", *jobs], env=cluster.env(),
                       timeout=30)
        deadline = time.monotonic() + 60
        while any(job_state(cluster, j) in ("RUNNING", "PENDING", "COMPLETING", "REQUEUED")
                  for j in jobs):
            assert time.monotonic() < deadline, f"jobs {jobs} still there 60 s after scancel"
            time.sleep(0.5)


def job_state(cluster: Cluster, job: int | str) -> str:
    """The job's state (of its first element for an array), or GONE."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", str(job)], env=cluster.env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=30)
    found = re.search(r"JobState=(\S+)", proc.stdout)
    return found.group(1) if found else "GONE"


def wait_for(what: str, ready, timeout: float, log: Path | None = None):
    """Poll ``ready()`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
            pytest.fail(f"not {what} after {timeout:.0f} s\n{tail}")
        time.sleep(0.2)


FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
