r"""Fault injection on the tiny config's `vae` stage (12 steps, a checkpoint every 3).

Each case runs `euphonium_jax.main` in subprocesses and does to it what an operator or a
cluster might: kill -9 at random moments (also right as a checkpoint is written), SIGTERM,
corrupt / truncate / delete a file of the newest checkpoint, tear the last line of
metrics.jsonl, start a second run on the same workdir, damage every checkpoint or the final
arrays. It then compares the final model with an uninterrupted run's, bit for bit, and
metrics.jsonl with that run's rows. Prints a markdown table (and writes it with --out).

  python experiments/chaos.py --out experiments/results/chaos.md
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from euphonium_jax import checkpoint, report  # noqa: E402

STEPS, CKPT = 12, 3
_TIMING = ("time", "steps_per_s", "eval/train_seconds")


def command(workdir: str) -> list[str]:
  return [sys.executable, "-m", "euphonium_jax.main", "--config",
          os.path.join(REPO, "configs", "tiny.py"), "--workdir", workdir,
          "--config.stages=('vae',)", f"--config.vae_train.steps={STEPS}",
          f"--config.vae_train.ckpt_every={CKPT}", "--config.vae_train.log_every=1"]


def env() -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=8")


def launch(workdir: str) -> subprocess.Popen:
  return subprocess.Popen(command(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, cwd=REPO, env=env())


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def run(workdir: str) -> tuple[int, str]:
  return finish(launch(workdir))


def last_step(workdir: str) -> int:
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    rows = report.read_metrics(workdir, "vae")
  return max((r["step"] for r in rows), default=-1)


def wait_for(proc: subprocess.Popen, cond, timeout: float = 600, poll: float = 0.02) -> bool:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if cond():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(poll)
  return False


def kill_at_step(workdir: str, step: int, sig=signal.SIGKILL) -> tuple[int, str]:
  proc = launch(workdir)
  wait_for(proc, lambda: last_step(workdir) >= step)
  if proc.poll() is None:
    proc.send_signal(sig)
  return finish(proc)


def ckpt_dir(workdir: str) -> str:
  return os.path.join(workdir, "vae", "checkpoints")


def newest_step_dir(workdir: str) -> str:
  steps = sorted(int(s) for s in os.listdir(ckpt_dir(workdir)) if s.isdigit())
  return os.path.join(ckpt_dir(workdir), str(steps[-1]))


def largest_data_file(directory: str) -> str:
  files = [os.path.join(r, n) for r, _, ns in os.walk(directory) for n in ns
           if "ocdbt.process" in r]
  return max(files, key=os.path.getsize)


def corrupt(path: str) -> None:
  with open(path, "r+b") as f:
    f.seek(max(0, min(512, os.path.getsize(path) - 4096)))
    f.write(os.urandom(4096))


def final_arrays(workdir: str):
  final = os.path.join(workdir, "vae", "final")
  if not checkpoint.is_done(final):
    return None
  import jax
  return [np.asarray(a) for a in jax.tree.leaves(checkpoint.load_final(final))]


def metric_rows(workdir: str) -> list[tuple]:
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    rows = report.read_metrics(workdir, "vae")
  return [(r["step"], tuple(sorted((k, v) for k, v in r.items()
                                   if k not in _TIMING + ("stage", "step"))))
          for r in rows]


def last_line(out: str) -> str:
  lines = [x for x in out.strip().splitlines() if x.strip()]
  return lines[-1].strip()[:240] if lines else ""


# ---------------------------------------------------------------------------- Cases


def case_random_kills(w, rng):
  kills = []
  for _ in range(3):
    if last_step(w) + 1 > STEPS - 1:
      break
    kill_at_step(w, rng.randint(last_step(w) + 1, STEPS - 1))
    kills.append(last_step(w))
  rc, out = run(w)
  return rc, out, f"kill -9 {len(kills)} times, last rows then {kills}"


def case_kill_mid_checkpoint(w, rng):
  """Killed the moment a checkpoint step's row is written: the save of that step follows."""
  seen = []
  for step in (3, 6):
    proc = launch(w)
    wait_for(proc, lambda: last_step(w) >= step, poll=0.002)
    time.sleep(rng.uniform(0.0, 0.05))
    seen.append(any("tmp" in n for n in os.listdir(ckpt_dir(w)))
                if os.path.isdir(ckpt_dir(w)) else False)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
  rc, out = run(w)
  return rc, out, f"kill -9 at the saves of steps 3, 6 (orbax tmp dir seen: {seen})"


def case_sigterm(w, rng):
  rc1, out1 = kill_at_step(w, 5, signal.SIGTERM)
  rc, out = run(w)
  said = [x[x.index("[vae] SIGTERM"):].strip() for x in out1.splitlines()
          if "[vae] SIGTERM" in x]
  return rc, out, f"SIGTERM at row 5: exit {rc1}, '{said[0] if said else last_line(out1)}'"


def _damage_newest(w, how):
  kill_at_step(w, 8)  # checkpoints 3 and 6 kept
  path = largest_data_file(newest_step_dir(w))
  if how == "corrupt":
    corrupt(path)
  elif how == "truncate":
    os.truncate(path, os.path.getsize(path) // 2)
  elif how == "delete":
    os.remove(path)
  elif how == "digest":
    os.remove(os.path.join(newest_step_dir(w), checkpoint.INTEGRITY))
  rc, out = run(w)
  said = [x for x in out.splitlines() if "is damaged" in x]
  return rc, out, (said[0].split(": ", 1)[1][:150] if said else "no message")


def case_all_damaged(w, rng):
  kill_at_step(w, 8)
  for s in os.listdir(ckpt_dir(w)):
    if s.isdigit():
      corrupt(largest_data_file(os.path.join(ckpt_dir(w), s)))
  rc, out = run(w)
  return rc, out, "every kept checkpoint corrupted"


def case_torn_metrics(w, rng):
  kill_at_step(w, 7)
  with open(os.path.join(w, "metrics.jsonl"), "a") as f:
    f.write('{"stage": "vae", "step": 8, "lo')
  rc, out = run(w)
  return rc, out, "torn last line appended after a kill -9"


def case_second_run(w, rng):
  first = launch(w)
  wait_for(first, lambda: last_step(w) >= 1)
  t0 = time.time()
  rc2, out2 = run(w)
  took = time.time() - t0
  rc, out = finish(first)
  return rc, out, f"second run: exit {rc2} in {took:.0f} s, '{last_line(out2)}'"


def case_damaged_final(w, rng):
  rc, out = run(w)
  corrupt(largest_data_file(os.path.join(w, "vae", "final", "arrays")))
  try:
    checkpoint.load_final(os.path.join(w, "vae", "final"))
    said = "loaded without an error"
  except checkpoint.CheckpointError as e:
    said = str(e)
  return 1, said, "4 KB corrupted in final/arrays, then loaded"


CASES = [
    ("kill -9 at 3 random steps", case_random_kills),
    ("kill -9 during checkpoint writes", case_kill_mid_checkpoint),
    ("SIGTERM, then resume", case_sigterm),
    ("4 KB corrupted in newest checkpoint", lambda w, r: _damage_newest(w, "corrupt")),
    ("newest checkpoint file truncated", lambda w, r: _damage_newest(w, "truncate")),
    ("newest checkpoint file deleted", lambda w, r: _damage_newest(w, "delete")),
    ("newest checkpoint's digest missing", lambda w, r: _damage_newest(w, "digest")),
    ("every checkpoint corrupted", case_all_damaged),
    ("torn metrics.jsonl line", case_torn_metrics),
    ("second run on the same workdir", case_second_run),
    ("final arrays corrupted", case_damaged_final),
]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--only", default="", help="run only cases whose name contains this")
  args = parser.parse_args()
  rng = random.Random(args.seed)
  root = tempfile.mkdtemp(prefix="euph_chaos_")
  t0 = time.time()
  base_dir = os.path.join(root, "uninterrupted")
  rc, out = run(base_dir)
  assert rc == 0, out[-3000:]
  base, base_rows = final_arrays(base_dir), metric_rows(base_dir)
  lines = ["| case | what was done | outcome | final model == uninterrupted | metrics rows "
           "== uninterrupted (each once) |", "|---|---|---|---|---|"]
  for name, fn in CASES:
    if args.only and args.only not in name:
      continue
    w = os.path.join(root, name.replace(" ", "_").replace("'", ""))
    t = time.time()
    rc, out, what = fn(w, rng)
    if name == "final arrays corrupted":
      outcome, same, rows = f"refused: {out[:150]}", "n/a (damage after the run)", "n/a"
    elif rc == 0 and (final := final_arrays(w)) is not None:
      damaged = [x for x in out.splitlines() if "is damaged" in x]
      outcome = "finished" + (f"; {len(damaged)} damaged checkpoint(s) named, older used"
                              if damaged else "")
      same = "yes" if all(np.array_equal(a, b) for a, b in zip(base, final)) and len(
          base) == len(final) else "NO"
      rows = "yes" if metric_rows(w) == base_rows else "NO"
    else:
      outcome, same, rows = f"stopped (exit {rc}): {last_line(out)}", "n/a (no final)", "n/a"
    lines.append(f"| {name} | {what} | {outcome} | {same} | {rows} |")
    print(lines[-1], f"({time.time() - t:.0f} s)", flush=True)
  table = "\n".join(lines)
  head = (f"# Chaos run on configs/tiny.py, vae stage ({STEPS} steps, checkpoint every {CKPT})"
          f"\n\n`python experiments/chaos.py` (seed {args.seed}), {time.time() - t0:.0f} s "
          "on this machine.\n\n")
  print("\n" + table)
  if args.out:
    with open(args.out, "w") as f:
      f.write(head + table + "\n")
  shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
