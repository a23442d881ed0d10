"""One run per workdir, and the record of every run of it.

`lock(workdir)` holds `WORKDIR/run.lock` for a run: an exclusive `flock` (the kernel drops it
when the holder dies, so a killed run never blocks the next one) and, inside the file, who
holds it (pid, host, start time, command), which a refused run names. On a filesystem without
`flock` the record alone decides: a holder whose pid is dead on this host is stale. The
processes of one multi-host run share the lock: process 0 takes it and tells the others
whether it could; a holder with the same run id (`EUPHONIUM_RUN_ID`, else
`EUPHONIUM_COORDINATOR`) is the same run (e.g. requeued on another host) and shares it too.

`record_run` appends each run to `WORKDIR/runs.jsonl` (time, host, command, the stages it
will run and skip, its full resolved config) and writes `WORKDIR/config.json` (the config of
the latest run that ran a stage: a rerun that skips everything leaves it alone).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Any, Iterator, Sequence

LOCK = "run.lock"
RUNS = "runs.jsonl"
CONFIG = "config.json"


class WorkdirInUse(RuntimeError):
  """Another run holds the workdir; the message names it."""


def _run_id() -> str:
  return (os.environ.get("EUPHONIUM_RUN_ID") or os.environ.get("EUPHONIUM_COORDINATOR")
          or "").strip()


def _pid_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), which a reused pid lacks."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _me() -> dict[str, Any]:
  return {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": _pid_start(os.getpid()),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "run_id": _run_id(), "command": " ".join(sys.argv)}


def _alive(holder: dict[str, Any]) -> bool:
  """Whether `holder` may still run: always when on another host (it cannot be checked)."""
  if holder.get("host") != socket.gethostname():
    return True
  pid = holder.get("pid")
  if not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # alive, another user's
  start = _pid_start(pid)
  return start is None or holder.get("pid_start") in (None, start)


def _read(fd: int) -> dict[str, Any]:
  os.lseek(fd, 0, os.SEEK_SET)
  data = b""
  while chunk := os.read(fd, 65536):
    data += chunk
  try:
    holder = json.loads(data.decode() or "{}")
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


def _same_run(holder: dict[str, Any]) -> bool:
  return bool(_run_id()) and holder.get("run_id") == _run_id()


def _refusal(workdir: str, holder: dict[str, Any]) -> WorkdirInUse:
  who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
         f"{holder.get('started', '?')}" if holder else "a run that has not written its name")
  cmd = f" ({holder['command']})" if holder.get("command") else ""
  return WorkdirInUse(
      f"{workdir} is in use by another run: {who}{cmd}. Wait for it to finish or pass another "
      f"--workdir; if that run is no longer running, delete {os.path.join(workdir, LOCK)}.")


class Lock:
  """A held workdir lock (None fd: shared with, or held by, another process of this run)."""

  def __init__(self, path: str, fd: int | None):
    self.path, self.fd = path, fd

  def release(self) -> None:
    if self.fd is None:
      return
    try:
      os.ftruncate(self.fd, 0)  # empty: nobody holds it (the file stays: no unlink race)
    finally:
      os.close(self.fd)  # closing drops the flock
      self.fd = None


def _acquire_here(workdir: str) -> Lock:
  path = os.path.join(workdir, LOCK)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # a live process holds it
      holder = _read(fd)
      if _same_run(holder):
        os.close(fd)
        return Lock(path, None)
      raise _refusal(workdir, holder) from None
    except OSError as e:  # no flock on this filesystem: the record decides
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise
      holder = _read(fd)
      if holder and _alive(holder) and not _same_run(holder):
        raise _refusal(workdir, holder) from None
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(_me(), indent=1) + "\n").encode())
    os.fsync(fd)
  except BaseException:
    os.close(fd)
    raise
  return Lock(path, fd)


def _processes() -> tuple[int, int]:
  import jax

  if not jax.distributed.is_initialized():
    return 0, 1
  return jax.process_index(), jax.process_count()


def acquire(workdir: str) -> Lock:
  """Takes the workdir lock (process 0 of a multi-process run; the others learn whether it
  could); raises WorkdirInUse naming the run that holds it."""
  index, count = _processes()
  if count == 1:
    return _acquire_here(workdir)
  from jax.experimental import multihost_utils
  import numpy as np

  held, error = None, None
  if index == 0:
    try:
      held = _acquire_here(workdir)
    except Exception as e:  # pylint: disable=broad-except  (the others must not wait)
      error = e
  ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
  if error is not None:
    raise error
  if not ok:
    raise WorkdirInUse(f"{workdir} is in use by another run (process 0 names it)")
  return held if held is not None else Lock(os.path.join(workdir, LOCK), None)


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[Lock]:
  """Holds the workdir lock for the body (see the module docstring)."""
  held = acquire(workdir)
  try:
    yield held
  finally:
    held.release()


# ------------------------------------------------------------------------- Provenance


def record_run(workdir: str, config_json: str, to_run: Sequence[str],
               skipped: Sequence[str] = ()) -> None:
  """Appends this run to WORKDIR/runs.jsonl; when it runs a stage, also writes its config to
  WORKDIR/config.json (atomically). Process 0 only."""
  if _processes()[0] != 0:
    return
  me = _me()
  entry = {"started": me["started"], "host": me["host"], "pid": me["pid"],
           "command": me["command"], "run_id": me["run_id"], "stages_run": list(to_run),
           "stages_skipped": list(skipped), "config": json.loads(config_json)}
  with open(os.path.join(workdir, RUNS), "a") as f:
    f.write(json.dumps(entry, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())
  if to_run:
    path = os.path.join(workdir, CONFIG)
    with open(path + ".tmp", "w") as f:
      f.write(config_json)
    os.replace(path + ".tmp", path)


def read_runs(workdir: str) -> list[dict[str, Any]]:
  """The entries of WORKDIR/runs.jsonl, oldest first (a torn last line is left out)."""
  path = os.path.join(workdir, RUNS)
  if not os.path.exists(path):
    return []
  runs = []
  with open(path) as f:
    for line in f:
      try:
        runs.append(json.loads(line))
      except ValueError:
        continue
  return runs
