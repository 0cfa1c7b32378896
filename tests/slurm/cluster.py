"""A one-host Slurm cluster for the tests: munged, slurmctld and slurmd on 127.0.0.1.

Everything lives in one temporary directory: its own MUNGE key and socket, a slurm.conf written
here (no cgroups, no accounting, one partition with this host as its only node), state, spool, pid
and log files. Client commands and the daemons find the configuration through SLURM_CONF, so a
system-wide Slurm, if any, is never touched. `stop` cancels the jobs, stops the three daemons by
pid, and ends any process left that carries this cluster's SLURM_CONF (a job's slurmstepd or ranks).

Debian's packages: apt-get install slurm-wlm munge (.ci/run does it). slurmd runs job steps as the
submitting user, so it needs root.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")

# Two stand-in GPUs (Slurm only counts the devices named in gres.conf; any character device will
# do) let a test request GPUs, so the scripts' GPU branch runs up to its checks.
GRES_CONF = """\
Name=gpu File=/dev/null
Name=gpu File=/dev/zero
"""

# Departures from a production configuration, for speed only: Slurm holds a requeued job for
# cred_expire + 1 seconds (default 120) before it can start, and then starts it at the next pass of
# the scheduler (default every 60 s; backfill every 30 s); KillWait (default 30 s) bounds teardown.
SLURM_CONF = """\
ClusterName=switchyard-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock,cred_expire=10
StateSaveLocation={root}/ctld
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
SchedulerParameters=sched_interval=1,bf_interval=1
JobRequeue=1
ReturnToService=2
KillWait=5
MailProg=/bin/true
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} Gres=gpu:2 State=UNKNOWN
PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class ClusterUnavailable(RuntimeError):
    """Slurm is not installed here, or its daemons did not come up (the message says which)."""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable_reason():
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge, as .ci/run does)"
    if os.geteuid() != 0:
        return "slurmd starts job steps as the submitting user and needs root"
    return None


class SlurmCluster:
    partition = "test"

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="switchyard-slurm-"))
        self.root.chmod(0o711)  # munged wants its socket's directory searchable by all
        self.conf = self.root / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.procs = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout=60):
        (self.root / "ctld").mkdir()
        (self.root / "spool").mkdir()
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text(
            SLURM_CONF.format(
                host=self.host,
                root=self.root,
                ctld_port=free_port(),
                slurmd_port=free_port(),
                cpus=max(2, os.cpu_count() or 1),
                partition=self.partition,
            )
        )
        (self.root / "gres.conf").write_text(GRES_CONF)  # read from beside slurm.conf
        r = str(self.root)
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                f"--key-file={key}",
                f"--socket={r}/munge.sock",
                f"--pid-file={r}/munged.pid",
                f"--seed-file={r}/munged.seed",
                f"--log-file={r}/munged.log",
            ],
        )
        self._wait_for(lambda: (self.root / "munge.sock").exists(), 10, "munged did not create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait_for(lambda: self.client("sinfo", "-h", "-N", "-o", "%T", check=False).strip() == "idle", timeout, "the node did not become idle")

    def _spawn(self, name, cmd):
        log = open(self.root / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _wait_for(self, ready, timeout, what):
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise ClusterUnavailable(f"{what} ({', '.join(dead) or 'no daemon'} exited):\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, lines=15):
        tails = []
        for path in sorted(self.root.glob("*.out")) + sorted(self.root.glob("*.log")):
            tails.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(tails)

    def client(self, *cmd, check=True):
        """Run a Slurm client command (sbatch, scontrol, ...) against this cluster; its stdout."""
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def sbatch(self, script, *args, options=(), env=None, cwd=None):
        """Submit a batch script; the job id. The job inherits self.env plus env (sbatch --export=ALL)."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *options, str(script), *map(str, args)],
            cwd=cwd,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr.strip()}"
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id):
        """`scontrol show job` as a dict: JobState, Restarts, ExitCode, Reason, StdOut, ..."""
        return dict(re.findall(r"(\w+)=(\S*)", self.client("scontrol", "-o", "show", "job", str(job_id))))

    def wait_job(self, job_id, done, timeout, what):
        """Poll the job until done(job dict) is true; fail with the job's state past the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if done(job):
                return job
            assert time.monotonic() < deadline, f"job {job_id}: {what} not reached in {timeout} s: {job.get('JobState')}, {job.get('Reason')}"
            time.sleep(0.5)

    def stop(self):
        """Cancel every job, stop the daemons this object started, then end what is left of the jobs."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.client("scancel", f"--partition={self.partition}", check=False)
            try:
                self._wait_for(lambda: not self.client("squeue", "-h", check=False).strip(), 30, "jobs still listed")
            except ClusterUnavailable:
                pass  # the sweep below ends whatever the jobs left
        for name in reversed(DAEMONS):
            proc = self.procs.get(name)
            if proc and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for pid in self._leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def _leftover_pids(self):
        """Processes whose environment names this cluster's slurm.conf: only its daemons' descendants."""
        marker = f"SLURM_CONF={self.conf}\0".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if marker in (entry / "environ").read_bytes():
                        pids.append(int(entry.name))
                except OSError:  # gone, or not ours to read
                    pass
        return pids
