"""experiments/bench_gpu.py --tiny: every row measured, times positive, MFU in (0, 1.5], and the
analytic FLOPs equal to the formula of its docstring worked out here for the tiny Wan."""
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [("rollout unguided", "lora", "full", "blocked"),
        ("rollout guided", "lora", "full", "blocked"),
        ("update LoRA", "lora", "full", "blocked"), ("update LoRA", "lora", "none", "blocked"),
        ("update full", "full", "full", "blocked"), ("update full", "full", "none", "blocked"),
        ("rollout guided", "lora", "full", "xla"), ("update LoRA", "lora", "full", "xla")]


def tiny_flops():
  """(W, A) FLOPs of one pass of configs/wan_tiny.py's 2-block Wan at 32x32x9: latents
  3x4x4 -> 12 tokens (patch 1x2x2), 16 text tokens, width 32, FFN 64."""
  tokens, text, d, ffn, layers = 12, 16, 32, 64, 2
  w = 2 * tokens * (6 * d * d + 2 * d * ffn) + 2 * text * 2 * d * d
  a = 4 * tokens * tokens * d + 4 * tokens * text * d
  return layers * w, layers * a


@pytest.mark.slow
def test_bench_gpu_tiny_table(tmp_path):
  out = tmp_path / "bench.md"
  res = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "bench_gpu.py"),
                        "--tiny", "--out", str(out)], cwd=str(tmp_path), capture_output=True,
                       text=True, timeout=900, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert res.returncode == 0, res.stderr[-3000:]
  text = out.read_text()
  assert text.strip() in res.stdout
  assert "Peak: float32 512^3 matmul" in text
  lines = [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("| row ")]
  cells = [[c.strip() for c in l.strip("|").split("|")] for l in lines]
  assert [tuple(c[:4]) for c in cells] == ROWS
  rows = {}
  for c in cells:
    compile_s, median, low, per, flops, rate, mfu = map(float, (c[4], c[5], c[6], c[8], c[9],
                                                               c[10], c[11]))
    for v in (compile_s, median, low, per, flops, rate):
      assert math.isfinite(v) and v > 0, c
    assert low <= median and 0 < mfu <= 1.5, c
    units = 1 if c[0].startswith("rollout") else 2  # sample-rollouts, trained transitions
    assert per == pytest.approx(median / units, rel=1e-2)  # the table's 3-4 digits
    assert rate == pytest.approx(flops / per, rel=1e-2)
    rows[tuple(c[:4])] = flops * 1e12

  # Analytic FLOPs: 6 CFG steps (2 passes each); the PRM (1 block) forward and backward to the
  # latent on the 2 guided steps; an update transition = CFG pair forward + backward (W + 2A
  # with LoRA, 2W + 2A full) + the KL reference's CFG pair forward.
  w, a = tiny_flops()
  w1, a1 = w / 2, a / 2
  assert rows[ROWS[0]] == pytest.approx(6 * 2 * (w + a), rel=1e-3)
  assert rows[ROWS[1]] == pytest.approx(6 * 2 * (w + a) + 2 * (2 * w1 + 3 * a1), rel=1e-3)
  assert rows[ROWS[2]] == pytest.approx(2 * (2 * w + 3 * a) + 2 * (w + a), rel=1e-3)
  assert rows[ROWS[4]] == pytest.approx(2 * (3 * w + 3 * a) + 2 * (w + a), rel=1e-3)
