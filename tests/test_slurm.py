"""The cluster scripts under a real SLURM: a single-node cluster on localhost from Debian's
packages (``scripts/slurm_local.sh``), jobs submitted with ``sbatch`` as a user would.

Needs ``apt-get install slurmctld slurmd slurm-client munge``; the tests start the cluster
(as root) if it is not running and stop it again at the end. Without those packages they
skip, saying so; installed but impossible to start is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from cnn import checkpoint

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "scripts" / "slurm_local.sh"
SBATCH = ROOT / "scripts" / "slurm_mpi.sbatch"
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel")
FLAGS = ["--dataset", "digits", "--test-subset", "64", "--epochs", "6", "--batch-size", "16",
         "--seed", "2"]
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
        "BOOT_FAIL", "DEADLINE", "PREEMPTED")


def _run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def slurm():
    """A running single-node SLURM; started here (and stopped after) if it was not up."""
    missing = [b for b in (*DAEMONS, *CLIENTS) if shutil.which(b, path=SBIN) is None]
    if missing:
        pytest.skip(f"SLURM is not installed (missing {', '.join(missing)}): apt-get install "
                    f"slurmctld slurmd slurm-client munge, then scripts/slurm_local.sh start")
    started = False
    if _run(["scontrol", "ping"]).returncode != 0:
        if os.geteuid() != 0:
            pytest.fail("SLURM is installed but not running, and only root can start it: "
                        "sudo scripts/slurm_local.sh start")
        proc = _run([str(LOCAL), "start"], timeout=180, env={**os.environ, "PATH": SBIN})
        assert proc.returncode == 0, f"scripts/slurm_local.sh start failed:\n{proc.stderr}"
        started = True
    yield
    if started:
        _run([str(LOCAL), "stop"], timeout=180, env={**os.environ, "PATH": SBIN})


def _job(job: str) -> dict[str, str]:
    out = _run(["scontrol", "show", "job", "-o", job]).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


RELEASE_AFTER_S = 3.0


def _wait(job: str, states: tuple[str, ...], timeout: float = 240,
          release: bool = False) -> dict[str, str]:
    """Poll the job until its state is one of ``states``; ``release``: start a requeued
    job early (SLURM holds it back about two minutes by default), but not within
    RELEASE_AFTER_S of seeing it pending: slurmd revokes the old run's credential and
    compares times in whole seconds, so a restart launched in the same second as the
    requeue is killed ("Job credential revoked") and the job ends FAILED."""
    deadline = time.monotonic() + timeout
    pending_since = None
    while True:
        info = _job(job)
        if info.get("JobState") in states:
            return info
        if release and info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            pending_since = pending_since or time.monotonic()
            if time.monotonic() - pending_since >= RELEASE_AFTER_S:
                _run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
        assert time.monotonic() < deadline, f"job {job} still {info.get('JobState')}: {info}"
        time.sleep(0.5)


def _submit(tmp: Path, strategy: str, argv: list[str], env: dict[str, str] | None = None,
            opts: tuple[str, ...] = ("--nodes=1", "--ntasks-per-node=2")) -> str:
    proc = _run(["sbatch", "--parsable", f"--chdir={tmp}", f"--output={tmp}/job-%j.out",
                 *opts, str(SBATCH), strategy, *argv],
                env={**os.environ, "VENV": sys.prefix, "BACKEND": "numpy",
                     "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _reference(tmp: Path, argv: list[str]) -> Path:
    """The uninterrupted run, with mpiexec (the same MPICH as the job's srun ranks)."""
    w = tmp / "ref.npz"
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    proc = _run([mpiexec, "-n", "2", sys.executable, "-m", "cnn.parallel.mpi", *argv,
                 "--no-progress", "--save-weights", str(w)], timeout=300,
                env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return w


def _same_weights(a: Path, b: Path) -> None:
    with np.load(a) as A, np.load(b) as B:
        assert sorted(A.files) == sorted(B.files)
        for k in A.files:
            np.testing.assert_array_equal(A[k], B[k], err_msg=k)


def _wait_file(path: Path, job: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        state = _job(job).get("JobState")
        assert state not in DONE, f"job {job} ended ({state}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def test_sbatch_runs_the_mpi_script_and_writes_its_results(slurm, tmp_path):
    job = _submit(tmp_path, "allreduce", ["--dataset", "digits", "--max-steps", "10"])
    info = _wait(job, DONE)
    out = (tmp_path / f"job-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    assert re.search(r"ranks: 0=pid \d+@\S+, 1=pid \d+@", out), out  # two ranks, one job
    df = pd.read_pickle(tmp_path / "results" / f"mpi_slurm_allreduce_2x1_{job}.pkl")
    assert df["processes"].iloc[-1] == 2 and df["step"].iloc[-1] == 10
    assert (df["strategy"] == "allreduce").all() and (df["experiment"] == "mpi_slurm").all()
    _, meta = checkpoint.load(tmp_path / "checkpoints" / f"cnn-mpi-{job}" / "checkpoint.npz")
    assert meta["global_step"] == 10


def test_a_signalled_job_checkpoints_requeues_and_ends_as_if_uninterrupted(slurm, tmp_path):
    """SLURM's time-limit warning (--signal=B:USR1@120, sent here by hand with scancel
    --batch --signal=USR1): the ranks checkpoint, the script requeues the job, the restart
    resumes; the final weights are the uninterrupted run's, bit for bit."""
    w = tmp_path / "w.npz"
    job = _submit(tmp_path, "allreduce", [*FLAGS, "--save-weights", str(w)])
    _wait_file(tmp_path / "checkpoints" / f"cnn-mpi-{job}" / "checkpoint.npz", job)
    t0 = time.monotonic()
    assert _run(["scancel", "--batch", "--signal=USR1", job]).returncode == 0
    info = _wait(job, ("PENDING", *DONE), timeout=60)
    stopped_in = time.monotonic() - t0
    out = (tmp_path / f"job-{job}.out").read_text()
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", out
    assert stopped_in < 30
    step = int(re.search(r"stopped on SIGUSR1 after step (\d+);", out)[1])
    assert f"requeueing job {job}" in out and not w.exists()
    info = _wait(job, DONE, release=True)
    out = (tmp_path / f"job-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    assert f"resumed from checkpoints/cnn-mpi-{job}/checkpoint.npz at step {step}" in out
    _same_weights(w, _reference(tmp_path, FLAGS))


def test_a_cancelled_job_checkpoints_and_a_new_job_resumes_it(slurm, tmp_path):
    """scancel (SIGTERM to every process of the job): the ranks still checkpoint; the job
    is not requeued (it was cancelled); a new job given its folder finishes the run."""
    w = tmp_path / "w.npz"
    job = _submit(tmp_path, "allreduce", [*FLAGS, "--save-weights", str(w)])
    ck = tmp_path / "checkpoints" / f"cnn-mpi-{job}"
    _wait_file(ck / "checkpoint.npz", job)
    assert _run(["scancel", job]).returncode == 0
    info = _wait(job, DONE, timeout=60)
    out = (tmp_path / f"job-{job}.out").read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", out
    step = int(re.search(r"stopped on SIGTERM after step (\d+);", out)[1])
    assert checkpoint.load(ck / "checkpoint.npz")[1]["global_step"] == step
    again = _submit(tmp_path, "allreduce", [*FLAGS, "--save-weights", str(w)],
                    env={"CKPT_DIR": str(ck)})
    info = _wait(again, DONE)
    out = (tmp_path / f"job-{again}.out").read_text()
    assert info["JobState"] == "COMPLETED", out
    assert f"at step {step}" in out
    _same_weights(w, _reference(tmp_path, FLAGS))


DRIVER = """
import sys, time
sys.path.insert(0, {scripts!r})
from ipp_slurm import slurm_cluster

with slurm_cluster(2, start_timeout=180) as cl:
    cl.push_code()
    df = cl.run(["--strategy", "allreduce", "--dataset", "digits", "--max-steps", "5",
                 "--batch-size", "16", "--no-progress"])
    print("RESULT", len(df), int(df["processes"].iloc[-1]), int(df["step"].iloc[-1]))
    print("ENGINES", *cl.info["pid"], flush=True)
    if {hold!r}:
        time.sleep(600)  # until the test's SIGTERM
print("LEFT", flush=True)
"""


def _engine_jobs() -> set[str]:
    out = _run(["squeue", "-h", "-o", "%i %j"]).stdout
    return {line.split()[0] for line in out.splitlines() if "ipengine-" in line}


@pytest.mark.parametrize("end", ["with-block", "sigterm"])
def test_ipp_slurm_cluster_runs_a_strategy_and_leaves_no_engines(slurm, tmp_path, end):
    """The ipyparallel MPI engines of scripts/ipp_slurm.py as a SLURM job: one strategy
    runs through them; when the driver leaves its with-block, or is sent SIGTERM (its own
    job cancelled), the engines' job ends and no engine process is left."""
    before = _engine_jobs()
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(scripts=str(ROOT / "scripts"), hold=end == "sigterm"))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while not any(line.startswith("ENGINES") for line in lines):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
            lines.append(line)
            assert time.monotonic() < deadline, lines
        jobs = _engine_jobs() - before
        assert len(jobs) == 1, jobs
        if end == "sigterm":
            proc.terminate()
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    result = next(line for line in lines if line.startswith("RESULT")).split()
    assert result[1:] == ["1", "2", "5"]  # one epoch row, two ranks, five steps
    assert proc.returncode == (0 if end == "with-block" else 128 + 15), err
    assert ("LEFT" in rest) == (end == "with-block")
    engines = [int(p) for p in next(line for line in lines if line.startswith("ENGINES"))
               .split()[1:]]
    job = jobs.pop()
    _wait(job, DONE, timeout=60)  # the engines' job has ended (ipengine under MPI exits 1
    # after a shutdown request: FAILED is an ended job too), and no engine is left:
    _, alive = psutil.wait_procs([psutil.Process(p) for p in engines if psutil.pid_exists(p)],
                                 timeout=30)
    assert not alive, f"engines left running: {alive}"
