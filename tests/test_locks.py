"""Shared-artifact locks: node-local file systems are refused inside SLURM jobs, refused locks get a clear error."""

import errno
import fcntl
import subprocess
import sys
import textwrap

import pytest

from eva_bench import locks

MOUNTS = textwrap.dedent("""\
    /dev/sda1 / ext4 rw,relatime 0 0
    fs1:/export/home /home nfs4 rw,vers=4.2,hard,proto=tcp,local_lock=none,addr=10.0.0.1 0 0
    fs2:/scratch /scratch nfs rw,vers=3,nolock,proto=tcp 0 0
    fs3:/projects /projects nfs4 rw,vers=4.1,local_lock=flock 0 0
    mds@tcp:/lustre /lustre lustre rw,flock 0 0
    mds@tcp:/lustre2 /lustre2 lustre rw,localflock 0 0
    fs1:/export/my\\040data /home/my\\040data nfs4 rw,local_lock=all 0 0
""")


@pytest.fixture
def mount_table(tmp_path, monkeypatch):
    table = tmp_path / "mounts"
    table.write_text(MOUNTS)
    monkeypatch.setattr(locks, "MOUNTS", table)


@pytest.mark.parametrize("folder,reason", [
    ("/home/alice/results", None),  # NFS passes flock to the server: shared between nodes
    ("/scratch/cache", "nfs mount /scratch with nolock"),
    ("/projects/x", "nfs4 mount /projects with local_lock=flock"),
    ("/lustre/eva", None),
    ("/lustre2/eva", "lustre mount /lustre2 with localflock"),
    ("/home/my data/results", "nfs4 mount /home/my data with local_lock=all"),  # an escaped space, the deeper mount
    ("/tmp/x", None),
])
def test_node_local_reason_reads_the_mount_holding_the_folder(mount_table, folder, reason):
    assert locks.node_local_reason(folder) == reason


def test_a_slurm_job_refuses_a_node_local_lock_unless_told_all_jobs_share_the_node(mount_table, monkeypatch, tmp_path):
    monkeypatch.setattr(locks, "node_local_reason", lambda folder: "nfs mount /scratch with nolock")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with locks.exclusive(tmp_path / "a.lock"):  # outside SLURM: one machine, node-local locks are the right ones
        pass
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.delenv(locks.ALLOW_NODE_LOCAL, raising=False)
    with pytest.raises(RuntimeError, match="bind only this node.*nolock.*EVA_BENCH_NODE_LOCAL_LOCKS"):
        with locks.exclusive(tmp_path / "a.lock"):
            pass
    monkeypatch.setenv(locks.ALLOW_NODE_LOCAL, "1")
    with locks.exclusive(tmp_path / "a.lock"):
        pass


def test_a_file_system_that_refuses_locks_gets_a_clear_error(monkeypatch, tmp_path):
    def refuse(handle, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(OSError, match="refuses file locks.*-o flock"):
        with locks.exclusive(tmp_path / "a.lock"):
            pass


def test_the_lock_excludes_another_process_and_dies_with_its_holder(tmp_path):
    path = tmp_path / "a.lock"
    probe = "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)"
    with locks.exclusive(path):
        held = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True)
        assert held.returncode != 0 and "BlockingIOError" in held.stderr
    assert subprocess.run([sys.executable, "-c", probe, str(path)]).returncode == 0
