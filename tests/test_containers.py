"""Constrained process environments: containers, pods, batch jobs, locked-down servers."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
from typing import Iterator

import dask
import dask.dataframe as dd
import distributed
import pytest

import dask_manymodel  # noqa: F401  (registers ddf.manymodel)
from dask_manymodel import FileSet, ManyModelRun, ModelSerde, RunStatus
from dask_manymodel.cli import main as cli_main
from dask_manymodel.exceptions import InvalidURLError

from .conftest import ROOT, fit_line, make_frame


def _private_mount_refused(folder: str) -> str | None:
    """Why a process cannot be given a disk of its own at ``folder`` (a
    tmpfs in a mount namespace of its own), or None when it can."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "needs unshare (util-linux)"
    probe = subprocess.run(
        [unshare, "-m", "--propagation", "private", "sh", "-c", f"mount -t tmpfs tmpfs {shlex.quote(folder)}"],
        capture_output=True, text=True, timeout=30,
    )
    if probe.returncode:
        return f"cannot mount a tmpfs in a new mount namespace (needs root): {probe.stderr.strip()}"
    return None


@contextlib.contextmanager
def worker_on_another_disk(cluster: distributed.LocalCluster, folder: str) -> Iterator[None]:
    """A worker process of ``cluster`` that sees an empty disk of its own at
    ``folder``, as a worker on another machine or in another pod sees
    nothing of the client's local folder there."""
    reason = _private_mount_refused(folder)
    if reason:
        pytest.skip(reason)
    worker = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs tmpfs {shlex.quote(folder)} && exec {shlex.quote(sys.executable)} -m "
         f"distributed.cli.dask_worker {cluster.scheduler_address} --nworkers 1 --nthreads 1 --no-dashboard"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        worker.terminate()
        worker.wait(timeout=60)


@pytest.fixture
def no_worker_cluster():
    with distributed.LocalCluster(
        n_workers=0, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster, distributed.Client(cluster, set_as_default=True) as client:
        yield cluster, client


def test_a_local_folder_the_workers_do_not_see_is_refused_before_anything_is_written(
    tmp_path, no_worker_cluster
):
    """A client's local folder with workers elsewhere (a notebook pod's
    volume that the worker pods do not mount): the client wrote the run's
    manifest on its disk, the tasks found none on theirs, and every group
    ended CANCELLED, "run 'r1' was deleted from ... while it ran"."""
    cluster, client = no_worker_cluster
    url = str(tmp_path / "models")
    ddf = dd.from_pandas(make_frame(n_groups=3, rows=4), npartitions=1)
    with worker_on_another_disk(cluster, str(tmp_path)):
        client.wait_for_workers(1, timeout=60)
        with pytest.raises(InvalidURLError, match=r"1 of the 1 workers \(tcp://.*\) do not see") as refused:
            ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1")
        assert "nothing was written" in str(refused.value)
        # a FileSet's files went to the workers' disks, and its manifest listed none
        with pytest.raises(InvalidURLError, match="do not see"):
            FileSet.make(url, "fs1", ddf)
    assert os.listdir(tmp_path) == []  # the check's marker file is gone too


@pytest.mark.filterwarnings("ignore:the cluster .* has no workers:UserWarning")
def test_a_local_folder_is_checked_on_the_workers_that_join_after_the_start(tmp_path, no_worker_cluster):
    """A cluster still scaling up (adapt(), jobs queued) has no worker to ask
    when the run starts: its count waits for them, and they are asked then."""
    cluster, client = no_worker_cluster
    url = str(tmp_path / "models")
    ddf = dd.from_pandas(make_frame(n_groups=3, rows=4), npartitions=1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        starting = pool.submit(ddf.manymodel.train, fit_line, by="store", url=url, run_id="r1")
        with worker_on_another_disk(cluster, str(tmp_path)):
            with pytest.raises(InvalidURLError, match="1 of the 1 workers .* do not see"):
                starting.result(timeout=120)
    assert os.listdir(tmp_path) == []


def test_a_home_folder_that_cannot_be_found_is_refused(client, tmp_path, monkeypatch):
    """``~name/...`` of no such user stayed a relative path, "~name/models":
    the run's manifest went into a folder "~name" of the client's working
    directory, the workers (in theirs) found no run, and every group ended
    CANCELLED, "run 'r1' was deleted from ~name/models while it ran"."""
    monkeypatch.chdir(tmp_path)
    url = "~no-such-user-of-manymodel/models"
    ddf = dd.from_pandas(make_frame(n_groups=3, rows=4), npartitions=1)
    with pytest.raises(InvalidURLError, match="there is no user 'no-such-user-of-manymodel' here"):
        ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1")
    assert os.listdir(tmp_path) == []


def _uid_without_passwd_entry() -> int | None:
    import pwd  # (POSIX only)

    for uid in range(23456, 23556):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    return None


def test_tilde_without_home_under_an_arbitrary_user_id(tmp_path):
    """OpenShift runs a container under an arbitrary user id with no passwd
    entry; with HOME unset too, ``~`` names no folder: the URL '~/models'
    stayed relative (see the test above) instead of saying so."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux) to run as a user id without a passwd entry")
    uid = _uid_without_passwd_entry()
    if uid is None:
        pytest.skip("no free user id without a passwd entry")
    os.chmod(tmp_path, 0o777)
    env = {key: value for key, value in os.environ.items() if key != "HOME"}
    code = "from dask_manymodel.store import open_url; open_url('~/models')"
    as_that_user = [setpriv, "--reuid", str(uid), "--regid", str(uid), "--clear-groups", sys.executable, "-c"]
    probe = subprocess.run(
        [*as_that_user, "import dask_manymodel"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )
    if probe.returncode:
        pytest.skip(f"this interpreter or checkout cannot be run as user id {uid}: {probe.stderr[-300:]}")
    out = subprocess.run([*as_that_user, code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert out.returncode == 1
    assert (
        f"InvalidURLError: cannot open url '~/models': '~' names no home folder here (HOME is not set and "
        f"user id {uid} has no entry in the password database"
    ) in out.stderr


class RecordingSerde(ModelSerde):
    """A serde that writes through a file (as torch's and Keras' do) and
    notes where: the tasks of a thread cluster share this list."""

    filename = "model.txt"
    paths: list[str] = []

    def write(self, model, file_path):
        RecordingSerde.paths.append(file_path)
        with open(file_path, "w") as f:
            f.write(" ".join(map(str, model)) + " " * int(model[0] == 999) * 2**20)  # group 999: 1 MiB

    def read(self, file_path):
        RecordingSerde.paths.append(file_path)
        with open(file_path) as f:
            return [float(x) for x in f.read().split()]


def predict_line(data, model, ctx):
    df = data.to_pandas()
    return df.assign(pred=model[0] * df["x"] + model[1])


@pytest.fixture
def scratch_cluster(tmp_path, monkeypatch):
    """A thread cluster whose workers' local directory is tmp_path/scratch,
    and Python's temp folder (TMPDIR) another: tmp_path/tmpdir."""
    os.mkdir(tmp_path / "tmpdir")
    os.mkdir(tmp_path / "scratch")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmpdir"))
    RecordingSerde.paths.clear()
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0",
        silence_logs=logging.ERROR, local_directory=str(tmp_path / "scratch"),
    ) as cluster, distributed.Client(cluster, set_as_default=True) as client:
        yield client


def test_workers_put_their_temp_files_in_their_local_directory(tmp_path, scratch_cluster):
    """On HPC nodes and in pods /tmp is often small (in memory, or the
    container's layer), and the cluster gives its workers a scratch disk
    (dask worker --local-directory, Dask's temporary-directory): the models
    on their way to and from remote storage went to TMPDIR all the same,
    and a model of GBs ended its group "No space left on device"."""
    url = f"memory://scratch-{uuid.uuid4().hex}"
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=2)
    serde = RecordingSerde()
    run = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", serde=serde)
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    scores = ddf.manymodel.predict(predict_line, by="store", url=url, training_run_id="r1", run_id="s1", serde=serde)
    assert scores.wait(show_progress=False) == RunStatus.SUCCESS
    assert len(RecordingSerde.paths) == 8  # 4 written, 4 read
    scratch = str(tmp_path / "scratch") + os.sep
    assert all(path.startswith(scratch) for path in RecordingSerde.paths), RecordingSerde.paths


def test_a_full_scratch_disk_is_named_when_a_model_is_read(tmp_path, scratch_cluster):
    """A model read from remote storage that its worker's scratch disk has
    no room for: "downloading ... failed after 4 attempts: No space left on
    device" did not say which side was full."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    url = f"memory://scratch-{uuid.uuid4().hex}"
    pdf = make_frame(n_groups=2, rows=5)
    ddf = dd.from_pandas(pdf, npartitions=1)

    def big_for_one(data, ctx):
        return [999.0, 0.0] if ctx.partition_id == 1 else [1.0, 0.0]

    run = ddf.manymodel.train(big_for_one, by="store", url=url, run_id="r1", serde=RecordingSerde())
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    scratch = str(tmp_path / "scratch")
    # each worker's folder becomes a disk of its own of 512 KiB from now: with
    # one disk for both, group 0's small copy on the other worker failed too
    # now and then, run while group 1's half-written 1 MiB filled it
    mounted = []
    try:
        for worker_dir in scratch_cluster.run(lambda dask_worker: dask_worker.local_directory).values():
            mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", worker_dir], capture_output=True)
            if mount.returncode:
                pytest.skip(f"cannot mount a tmpfs: {mount.stderr!r}")
            mounted.append(worker_dir)
        scores = ddf.manymodel.predict(predict_line, by="store", url=url, training_run_id="r1", run_id="s1")
        assert scores.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
        summary = scores.summary().set_index("partition_id")
        assert summary.loc[0, "status"] == "DONE"
        assert summary.loc[1, "status"] == "INTERNAL_ERROR"
        error = summary.loc[1, "error"]
        assert error.startswith(
            f"could not copy model file {url}/r1/store=1/model.txt to this worker's disk to read it, in {scratch}/"
        )
        assert "No space left on device; that disk is full (or over quota): give the workers a scratch folder" in error
    finally:
        for worker_dir in mounted:
            subprocess.run(["umount", worker_dir], check=True)


@contextlib.contextmanager
def _not_writable(folder: str) -> Iterator[None]:
    """``folder`` as one this process may not write in: a read-only tmpfs
    mounted on it as root (permissions do not stop root), else its mode."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        try:
            yield
        finally:
            os.chmod(folder, 0o755)
        return
    if shutil.which("mount") is None:
        pytest.skip("needs mount to make a read-only folder as root")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", folder], capture_output=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs: {mount.stderr!r}")
    try:
        yield
    finally:
        subprocess.run(["umount", folder], check=True)


def test_a_temporary_directory_the_client_cannot_write_is_passed_over(thread_client, tmp_path):
    """A dask config shared with the workers (a site's dask.yaml) names their
    scratch disk as temporary-directory, there on the client's machine but
    read-only (or not the user's): get_model of a run on remote storage
    failed in the client, "[Errno 30] Read-only file system"."""
    url = f"memory://ro-scratch-{uuid.uuid4().hex}"
    ddf = dd.from_pandas(make_frame(n_groups=4), npartitions=2)
    run = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    scratch = str(tmp_path / "scratch")
    os.mkdir(scratch)
    with _not_writable(scratch), dask.config.set({"temporary-directory": scratch}):
        assert not os.access(scratch, os.W_OK)
        assert [round(v, 6) for v in run.get_model(3)] == [1.3, 3.0]
        assert [round(v, 6) for v in ManyModelRun.restore_from("r1", url).get_model(2)] == [1.2, 2.0]


def test_a_relative_url_in_a_deleted_working_directory(tmp_path, monkeypatch):
    """A batch job's folder cleaned up while a process still ran in it:
    a relative URL failed with a bare "FileNotFoundError: [Errno 2] No such
    file or directory", naming no file (restore_from, a run, the CLI)."""
    gone = tmp_path / "job"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    gone_cwd = "'models': it is a relative path, and this process's working directory no longer exists"
    with pytest.raises(InvalidURLError, match=gone_cwd):
        ManyModelRun.restore_from("r1", "models")
    assert cli_main(["runs", "models"]) == 2
