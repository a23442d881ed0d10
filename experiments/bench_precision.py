r"""float32 against bfloat16 (float32 accumulation) on the embedded path, on this machine.

  python experiments/bench_precision.py [--config configs/demo.py] [--rounds 2] [--repeats 3]

Runs `experiments/bench_grpo.py` (which times the `grpo` stage's own programs:
`policy.make_rollout_program` with guidance and VAE decode, and `policy.make_update_step`) in
alternating rounds, float32 then `--config.model.dtype=bfloat16 --config.vae.dtype=bfloat16`
(the DiT, the PRM trunk that shares `model.dtype`, and the VAE decoder run their matmuls and
convolutions in bf16 with float32 accumulation; parameters, the SDE update, log-probs,
advantages, losses and the optimiser state stay float32), so that a change in the load of a
shared machine hits both alike. Prints, per program, the median over rounds of each round's
median, and the bf16 / f32 ratio; an iteration is one guided rollout plus the optimiser steps
of one iteration (`prompts_per_iteration x group_size / samples_per_update` of them). The
machine's bf16 matmul speed-up (bench_grpo's 2048^3 peak rows) is printed beside, which says
whether the CPU has bf16 matrix units (Intel AMX: about 3x; AMD Zen without AVX512-BF16: ~1x).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = ("rollout guided", "rollout unguided", "GRPO update step", "velocity fwd",
        "decode", "PRM value+grad", "matmul f32 2048^3", "matmul bf16->f32 2048^3")
BF16 = ["--config.model.dtype=bfloat16", "--config.vae.dtype=bfloat16"]


def run_bench(config: str, repeats: int, extra: list[str], passthrough: list[str]) -> dict:
  cmd = [sys.executable, os.path.join(HERE, "bench_grpo.py"), f"--config={config}",
         f"--repeats={repeats}", *extra, *passthrough]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
  medians = {}
  for line in out.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) > 4 and cells[0] in ROWS:
      medians[cells[0]] = float(cells[3])
  m = re.search(r"(\d+) samples/step", out)
  medians["_per_update"] = int(m.group(1)) if m else 0
  m = re.search(r"batch (\d+) prompts x G (\d+)", out)
  medians["_batch"] = int(m.group(1)) * int(m.group(2)) if m else 0
  return medians


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/demo.py")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=3)
  args, passthrough = ap.parse_known_args()
  load0 = " ".join(f"{v:.2f}" for v in os.getloadavg())
  runs = {"float32": [], "bfloat16": []}
  for r in range(args.rounds):
    for name, extra in (("float32", []), ("bfloat16", BF16)):
      print(f"[precision] round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
      runs[name].append(run_bench(args.config, args.repeats, extra, passthrough))
  load1 = " ".join(f"{v:.2f}" for v in os.getloadavg())
  cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
              if l.startswith("model name")), "?") if os.path.exists("/proc/cpuinfo") else "?"
  flags_ = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
  units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags_]
  med = {k: {row: statistics.median(run[row] for run in v) for row in ROWS if row in v[0]}
         for k, v in runs.items()}
  n_upd = {k: max(v[0]["_batch"] // max(v[0]["_per_update"], 1), 1) for k, v in runs.items()}
  for k in med:
    med[k]["iteration (guided rollout + updates)"] = (
        med[k]["rollout guided"] + n_upd[k] * med[k]["GRPO update step"])
  print(f"bench_precision: {args.config} {' '.join(passthrough)}; machine: {cpu}, "
        f"{os.cpu_count()} cores, bf16 units: {', '.join(units) or 'none'}; load avg "
        f"{load0} -> {load1}; {args.rounds} alternating rounds of bench_grpo --repeats "
        f"{args.repeats}; seconds = median over rounds of each round's median")
  print()
  print("| program                               | float32 s | bfloat16 s | bf16 / f32 |")
  print("|---------------------------------------|-----------|------------|------------|")
  for row in med["float32"]:
    a, b = med["float32"][row], med["bfloat16"][row]
    print(f"| {row:37s} | {a:9.4f} | {b:10.4f} | {b / a:10.3f} |")


if __name__ == "__main__":
  main()
