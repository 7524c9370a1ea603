"""One owner per workdir (par_jax.core.workdir): refusal naming the owner, stale locks taken over, release and check,
a race of many runs started at once, an object-store path (gs:// on epath's own mock backend), and the processes of
one multi-process job following process 0."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import gpath, testing as epath_testing

from par_jax.core import workdir as workdir_lib
from par_jax.core.workdir import WorkdirInUseError, WorkdirLock


def _lock_data(path):
    return json.loads((epath.Path(path) / "LOCK").read_text())


def _write_lock(path, **changes):
    """A LOCK as another run on this machine would write it, with `changes`."""
    owner = workdir_lib._this_process("f" * 32, "train")
    data = dict(dataclasses.asdict(owner), **changes)
    (epath.Path(path) / "LOCK").write_text(json.dumps(data))
    return data


def _dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)  # reaped by subprocess.run: no process has this pid now (barring reuse)


def test_second_lock_refuses_naming_the_first(tmp_path):
    with WorkdirLock(tmp_path, job="train") as first:
        data = _lock_data(tmp_path)
        assert data["run_id"] == first.run_id and data["job"] == "train" and data["pid"] == os.getpid()
        assert data["host"] == socket.gethostname() and data["process_count"] == 1 and data["started"]
        with pytest.raises(WorkdirInUseError) as e:
            WorkdirLock(tmp_path, job="train_tokenizer").acquire()
        message = str(e.value)
        for part in ("in use by another run", "job 'train'", f"host {socket.gethostname()}", f"pid {os.getpid()}",
                     data["started"], first.run_id, f"delete {tmp_path / 'LOCK'}", f"once process {os.getpid()}"):
            assert part in message, (part, message)
        assert len(message.splitlines()) == 1 and len(message) < 600
        assert _lock_data(tmp_path)["run_id"] == first.run_id  # the refused run changed nothing
    assert not (tmp_path / "LOCK").exists()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    old = _write_lock(tmp_path, pid=_dead_pid())
    with WorkdirLock(tmp_path, job="train") as lock:
        assert _lock_data(tmp_path)["run_id"] == lock.run_id != old["run_id"]
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "taking over" in warning and f"pid {old['pid']}" in warning and old["run_id"] in warning
    assert sorted(os.listdir(tmp_path)) == []  # no stale or temporary files left behind


def test_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    _write_lock(tmp_path, pid=os.getpid(), pid_start="1")  # a live pid, but started at another time: not that run
    with WorkdirLock(tmp_path, job="train") as lock:
        assert _lock_data(tmp_path)["run_id"] == lock.run_id


@pytest.mark.parametrize("changes", [dict(host="elsewhere-host"), dict(boot_id="another-boot")])
def test_lock_of_another_machine_is_refused_even_with_a_dead_pid(tmp_path, changes):
    old = _write_lock(tmp_path, pid=_dead_pid(), **changes)
    with pytest.raises(WorkdirInUseError, match="once you are sure that run has stopped") as e:
        WorkdirLock(tmp_path, job="train").acquire()
    assert f"host {old['host']}" in str(e.value) and f"pid {old['pid']}" in str(e.value)
    assert _lock_data(tmp_path)["run_id"] == old["run_id"]


def test_unreadable_lock_is_refused_not_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lib.time, "sleep", lambda s: None)
    (tmp_path / "LOCK").write_text("{half a lo")
    with pytest.raises(WorkdirInUseError, match="cannot be read.*delete"):
        WorkdirLock(tmp_path, job="train").acquire()
    assert (tmp_path / "LOCK").read_text() == "{half a lo"


def test_release_removes_only_our_own_lock(tmp_path):
    lock = WorkdirLock(tmp_path, job="train")
    lock.acquire()
    lock.release()
    assert not (tmp_path / "LOCK").exists()
    lock.release()  # idempotent
    lock.acquire()
    foreign = _write_lock(tmp_path, host="elsewhere-host")  # another run took the workdir over
    lock.release()
    assert _lock_data(tmp_path) == foreign


def test_check_raises_after_a_foreign_overwrite(tmp_path):
    with WorkdirLock(tmp_path, job="train") as lock:
        lock.check()
        foreign = _write_lock(tmp_path, host="elsewhere-host", pid=4242)
        with pytest.raises(WorkdirInUseError, match="taken over by another run") as e:
            lock.check()
        assert "elsewhere-host" in str(e.value) and "pid 4242" in str(e.value) and lock.run_id in str(e.value)
    assert _lock_data(tmp_path) == foreign  # the context exit left the other run's lock alone


def test_check_rewrites_a_lock_deleted_by_hand(tmp_path, caplog):
    with WorkdirLock(tmp_path, job="train") as lock:
        (tmp_path / "LOCK").unlink()
        lock.check()
        assert _lock_data(tmp_path)["run_id"] == lock.run_id
    assert "disappeared" in caplog.text


def test_runs_started_together_have_exactly_one_winner(tmp_path):
    locks = [WorkdirLock(tmp_path / "shared", job="train") for _ in range(8)]
    barrier, results = threading.Barrier(len(locks)), [None] * len(locks)

    def start(i):
        barrier.wait()
        try:
            locks[i].acquire()
            results[i] = "won"
        except WorkdirInUseError as e:
            results[i] = str(e)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(locks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("won") == 1, results
    winner = locks[results.index("won")]
    assert _lock_data(tmp_path / "shared")["run_id"] == winner.run_id
    assert all("in use by another run" in r for r in results if r != "won")
    assert os.listdir(tmp_path / "shared") == ["LOCK"]


# ----- an object store: gs:// paths served from a local folder through epath's own mock backend -----

@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
    """gs://bucket/... -> tmp_path/bucket/... for every epath call (local paths pass through); an attempt to treat
    the URL as a local path (open, os.link on "gs://...") fails, as it would on a real bucket."""
    root = str(tmp_path)

    def local(p):
        p = os.fspath(p)
        return os.path.join(root, p[len("gs://"):]) if p.startswith("gs://") else p

    def one(fn, p, *args, **kwargs):
        return fn(local(p), *args, **kwargs)

    def two(fn, p, dst, *args, **kwargs):
        return fn(local(p), local(dst), *args, **kwargs)

    monkeypatch.setenv("EPATH_USE_TF", "false")  # else gs:// goes to tf.io.gfile, whatever the mock says
    gpath._is_tf_installed.cache_clear()
    monkeypatch.setattr(WorkdirLock, "settle_seconds", 0.0)
    with epath_testing.mock_epath(open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
                                  rmtree=one, stat=one, glob=one, rename=two, replace=two):
        yield "gs://bucket/run", tmp_path / "bucket" / "run"
    gpath._is_tf_installed.cache_clear()


def test_object_store_lock_refuses_a_second_run_and_releases(fake_bucket):
    url, folder = fake_bucket
    with WorkdirLock(url, job="train") as first:
        assert _lock_data(folder)["run_id"] == first.run_id
        with pytest.raises(WorkdirInUseError, match=f"pid {os.getpid()}"):
            WorkdirLock(url, job="train").acquire()
        first.check()
    assert not (folder / "LOCK").exists()


def test_object_store_loser_of_a_simultaneous_start_stops(fake_bucket, monkeypatch):
    url, folder = fake_bucket
    # Two runs found no lock and both wrote theirs; the other run's write landed last, while this one settled.
    other = {}
    monkeypatch.setattr(workdir_lib.time, "sleep", lambda s: other.update(_write_lock(folder, host="other-host")))
    with pytest.raises(WorkdirInUseError, match="other-host"):
        WorkdirLock(url, job="train").acquire()
    assert _lock_data(folder)["run_id"] == other["run_id"]


def test_object_store_loser_is_stopped_by_check_before_its_save(fake_bucket):
    url, folder = fake_bucket
    lock = WorkdirLock(url, job="train")
    lock.acquire()  # both runs read their own id back ...
    _write_lock(folder, host="other-host")  # ... and the other's write lands afterwards
    with pytest.raises(WorkdirInUseError, match="taken over by another run.*other-host"):
        lock.check()


def test_object_store_stale_lock_is_taken_over(fake_bucket, caplog):
    url, folder = fake_bucket
    folder.mkdir(parents=True)
    old = _write_lock(folder, pid=_dead_pid())
    with WorkdirLock(url, job="train") as lock:
        assert _lock_data(folder)["run_id"] == lock.run_id
    assert old["run_id"] in caplog.text and "taking over" in caplog.text


# ----- several processes of one job -----

def _as_process(monkeypatch, index, count, process0_says):
    """Make this process look like process `index` of `count`, with process 0 broadcasting (ok, run id)."""
    from jax.experimental import multihost_utils  # noqa: PLC0415
    ok, run_id = process0_says
    message = np.concatenate([[int(ok)], np.frombuffer(bytes.fromhex(run_id), np.uint8).astype(np.int32)])
    sent = []
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all",
                        lambda x: sent.append(np.asarray(x)) or np.asarray(message, np.int32))
    return sent


def test_other_processes_of_the_job_follow_process_0(tmp_path, monkeypatch):
    with WorkdirLock(tmp_path, job="train") as process0:  # process 0's lock, written as on its host
        before = (tmp_path / "LOCK").read_text()
        sent = _as_process(monkeypatch, 1, 2, (True, process0.run_id))
        follower = WorkdirLock(tmp_path, job="train")
        follower.acquire()  # no refusal although the pid is alive: process 0 said yes
        assert follower.run_id == process0.run_id
        follower.check()
        follower.release()
        assert (tmp_path / "LOCK").read_text() == before  # a follower never writes or removes the lock
        assert len(sent) == 2  # acquire and check: one broadcast each


def test_other_processes_stop_when_process_0_refuses(tmp_path, monkeypatch):
    _as_process(monkeypatch, 3, 4, (False, "0" * 32))
    with pytest.raises(WorkdirInUseError, match="process 0 of this job"):
        WorkdirLock(tmp_path, job="train").acquire()
    assert not (tmp_path / "LOCK").exists()
