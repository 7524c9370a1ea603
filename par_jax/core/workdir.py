"""One owner per workdir: a lock file, `WORKDIR/LOCK`, that names the run writing there.

Two runs on one workdir overwrite each other's checkpoints (the survivor's weights under the other's config.json)
or both crash inside orbax at the first save. So a job that writes a workdir takes its lock first and checks it
before every save:

    with WorkdirLock(workdir, job="train") as lock:
        ...
        lock.check()           # before each save: stop if another run has taken the workdir
        ckpt.save(...)

The lock is a small JSON file: run id, job, host, pid, start time and process count (plus what tells this machine's
processes apart: the kernel's boot id and the pid namespace). Only process 0 of a job writes and reads it; the
other processes of the same job follow process 0's decision (one broadcast, skipped on a single process), so a
multi-process job shares its workdir while every other run is refused.

- Local filesystems: the lock is created atomically (a hard link of a finished file; O_CREAT|O_EXCL where links are
  not supported), so of two runs started together exactly one wins.
- Object stores (`gs://`, any path with a scheme): there is no atomic create. The lock is written, left a moment,
  and read back; the run whose id is not there stops. Two runs that both read their own id back are caught later:
  `check()` before every save sees the other's id and stops the loser before it writes.
- A lock whose process is gone (same machine, pid no longer running) is stale: it is taken over with a warning
  naming the old owner. A lock from another machine, or from a live process, is refused with a message naming that
  run and saying how to take over (delete WORKDIR/LOCK once that run is surely stopped).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
import uuid
from typing import Optional

import jax
import numpy as np
from absl import logging
from etils import epath

from par_jax.core import paths

LOCK_NAME = "LOCK"
_RUN_ID_BYTES = 16


class WorkdirInUseError(RuntimeError):
    """Another run owns the workdir (or took it over while this run was going): this run must not write there."""


@dataclasses.dataclass(frozen=True)
class _Owner:
    """The contents of a LOCK file."""
    run_id: str
    job: str
    host: str
    pid: int
    started: str            # UTC, "YYYY-MM-DD HH:MM:SS UTC"
    process_count: int
    boot_id: str = ""       # the kernel's boot id: the same host name on another machine (or after a reboot) differs
    pid_ns: str = ""        # the pid namespace: a pid means the same process only inside one namespace
    pid_start: str = ""     # the process's start time since boot: a reused pid has another

    @classmethod
    def read(cls, path: epath.Path) -> Optional["_Owner"]:
        """The owner recorded in `path`; None if there is no such file. Raises ValueError if it is unreadable."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
            fields = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in fields})
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path} is not a par_jax lock file ({type(e).__name__}: {e})") from e

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1) + "\n"

    def describe(self) -> str:
        procs = f", {self.process_count} processes" if self.process_count > 1 else ""
        return f"job {self.job!r} on host {self.host}, pid {self.pid}, started {self.started}{procs} (run {self.run_id})"


def _read_first_line(path: str) -> str:
    try:
        with open(path) as f:  # noqa: PTH123 (this machine's /proc and /sys, never a workdir path)
            return f.readline().strip()
    except OSError:
        return ""


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_start(pid: int) -> str:
    """The start time of process `pid` in clock ticks since boot (Linux), "" where unknown."""
    stat = _read_first_line(f"/proc/{pid}/stat")
    fields = stat.rpartition(")")[2].split()  # the command name in parentheses may contain spaces
    return fields[19] if len(fields) > 19 else ""


def _this_process(run_id: str, job: str) -> _Owner:
    return _Owner(run_id=run_id, job=job, host=socket.gethostname(), pid=os.getpid(),
                  started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                  process_count=jax.process_count(), boot_id=_read_first_line("/proc/sys/kernel/random/boot_id"),
                  pid_ns=_pid_ns(), pid_start=_pid_start(os.getpid()))


def _on_this_machine(owner: _Owner) -> bool:
    """Whether `owner`'s pid can be looked up here: same host name, same boot, same pid namespace."""
    return (owner.host == socket.gethostname() and owner.boot_id == _read_first_line("/proc/sys/kernel/random/boot_id")
            and owner.pid_ns == _pid_ns())


def _is_running(owner: _Owner) -> bool:
    """Whether `owner`'s process still runs (call only when `_on_this_machine(owner)`)."""
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    stat = _read_first_line(f"/proc/{owner.pid}/stat")
    if stat and stat.rpartition(")")[2].split()[:1] == ["Z"]:  # ended, not yet reaped by its parent
        return False
    return not (owner.pid_start and _pid_start(owner.pid) not in ("", owner.pid_start))  # else a reused pid


class WorkdirLock:
    """The lock of one job's run on `workdir`: `acquire()` at start, `check()` before every save, `release()` at
    the end (or use it as a context manager). `run_id` is the same on every process of the job."""

    settle_seconds = 1.0  # object stores: how long a written lock is left before it is read back

    def __init__(self, workdir, *, job: str):
        self.workdir = paths.as_path(workdir)
        self.path = self.workdir / LOCK_NAME
        self.job = job
        self.run_id: Optional[str] = None
        self._owner: Optional[_Owner] = None  # what this run wrote (process 0 only)

    # ----- the API -----

    def acquire(self) -> None:
        """Take the workdir for this run or raise WorkdirInUseError naming the run that has it."""
        if self.run_id is not None:
            return
        run_id, error = uuid.uuid4().hex, None
        if jax.process_index() == 0:
            try:
                self._take(_this_process(run_id, self.job))
            except Exception as e:  # noqa: BLE001 (the other processes must hear of any failure, not wait forever)
                error = e
        ok, run_id = _agree(error is None, run_id)
        if error is not None:
            raise error
        if not ok:
            raise WorkdirInUseError(f"{self.workdir} could not be taken for this run; process 0 of this job says "
                                    f"why (see its log).")
        self.run_id = run_id

    def check(self) -> None:
        """Before every save: raise WorkdirInUseError if another run now owns the workdir."""
        if self.run_id is None:
            raise RuntimeError("WorkdirLock.check() before acquire()")
        error = None
        if jax.process_index() == 0:
            try:
                self._check_owner()
            except Exception as e:  # noqa: BLE001 (as in acquire)
                error = e
        ok, _ = _agree(error is None, self.run_id)
        if error is not None:
            raise error
        if not ok:
            raise WorkdirInUseError(f"{self.workdir} is no longer this run's; process 0 of this job says why (see "
                                    f"its log).")

    def release(self) -> None:
        """Remove the lock if it is still this run's (a lock another run took over is left to that run)."""
        owner, self._owner, self.run_id = self._owner, None, None
        if owner is None:
            return
        try:
            current = _Owner.read(self.path)
        except (ValueError, OSError) as e:
            logging.warning("leaving %s in place: it cannot be read (%s).", self.path, e)
            return
        if current is not None and current.run_id == owner.run_id:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ----- process 0 -----

    def _take(self, me: _Owner) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a few rounds: a stale lock taken over by two runs at once leaves one winner
            current = self._read_settled()
            if current is not None:
                if _on_this_machine(current) and not _is_running(current):
                    logging.warning("taking over %s: its run (%s) is no longer running.", self.path,
                                    current.describe())
                    if not self._remove_stale(current):
                        continue
                else:
                    raise WorkdirInUseError(self._in_use_message(current))
            if self._create(me):
                self._owner = me
                return
        raise WorkdirInUseError(f"could not take {self.path}: other runs keep taking it. Use a workdir of your own.")

    def _create(self, me: _Owner) -> bool:
        """Write the lock; False if another run's lock appeared first (it is then read and judged again)."""
        if paths.is_remote(self.path):
            self.path.write_text(me.to_json())
            time.sleep(self.settle_seconds)
            written = self._read_settled()
            return written is not None and written.run_id == me.run_id
        path = os.fspath(self.path)
        tmp = f"{path}.{me.run_id}.tmp"
        with open(tmp, "w") as f:  # noqa: PTH123 (a local path: the atomic create needs the OS calls)
            f.write(me.to_json())
        try:
            os.link(tmp, path)  # atomic, and the lock is never seen half-written
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links
            return self._create_exclusive(path, me)
        finally:
            os.unlink(tmp)

    @staticmethod
    def _create_exclusive(path: str, me: _Owner) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(me.to_json())
        return True

    def _remove_stale(self, stale: _Owner) -> bool:
        """Remove a stale lock; False if another run replaced it meanwhile (then it is judged again)."""
        if paths.is_remote(self.path):
            return True  # no atomic rename: our write overwrites it, and the read-back decides
        path = os.fspath(self.path)
        aside = f"{path}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(path, aside)  # atomic: of two runs taking over the same stale lock, one moves it
        except FileNotFoundError:
            return False
        try:
            moved = _Owner.read(epath.Path(aside))
        except ValueError:
            moved = None
        if moved is None or moved.run_id != stale.run_id:  # we moved a fresh lock of another run: put it back
            try:
                os.link(aside, path)
            except OSError:
                pass
            os.unlink(aside)
            return False
        os.unlink(aside)
        return True

    def _check_owner(self) -> None:
        current = self._read_settled()
        if current is None:
            logging.warning("%s has disappeared (deleted by hand?); writing it again for run %s.", self.path,
                            self._owner.run_id)
            if not self._create(self._owner):
                current = self._read_settled()
                if current is not None and current.run_id != self._owner.run_id:
                    raise WorkdirInUseError(self._taken_message(current))
            return
        if current.run_id != self._owner.run_id:
            raise WorkdirInUseError(self._taken_message(current))

    def _read_settled(self) -> Optional[_Owner]:
        """The lock's owner, retrying briefly when the file is caught mid-write (object stores)."""
        for attempt in range(10):
            try:
                return _Owner.read(self.path)
            except ValueError as e:
                if attempt == 9:
                    raise WorkdirInUseError(
                        f"{self.path} exists but cannot be read ({e}). Another run may be starting on "
                        f"{self.workdir}; if none is, delete {self.path} and rerun.") from None
                time.sleep(0.2)
        return None

    # ----- messages -----

    def _in_use_message(self, owner: _Owner) -> str:
        if _on_this_machine(owner):
            when = f"once process {owner.pid} has ended"
        else:
            when = (f"once you are sure that run has stopped (check on host {owner.host}; its machine may be gone, "
                    f"e.g. after a preemption)")
        return (f"workdir {self.workdir} is in use by another run: {owner.describe()}. One workdir holds one run: "
                f"wait for it to finish or choose another --workdir. To take over a workdir whose run is no longer "
                f"running, delete {self.path} ({when}) and rerun.")

    def _taken_message(self, owner: _Owner) -> str:
        return (f"workdir {self.workdir} has been taken over by another run ({owner.describe()}): this run "
                f"({self.job}, run {self._owner.run_id}) stops before writing there again. Its last checkpoints are "
                f"kept; its LOCK now belongs to the other run.")


def _agree(ok: bool, run_id: str) -> tuple[bool, str]:
    """Process 0's (ok, run id) on every process of the job (no collective on a single process)."""
    if jax.process_count() == 1:
        return ok, run_id
    from jax.experimental import multihost_utils  # noqa: PLC0415 (multi-process jobs only)
    raw = np.frombuffer(bytes.fromhex(run_id), dtype=np.uint8)
    message = np.concatenate([np.array([int(ok)], np.int32), raw.astype(np.int32)])
    got = np.asarray(multihost_utils.broadcast_one_to_all(message))
    return bool(got[0]), bytes(got[1:1 + _RUN_ID_BYTES].astype(np.uint8)).hex()
