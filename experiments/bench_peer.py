r"""The project's jitted Wan rollout against diffusers' `WanTransformer3DModel` (PyTorch) stepping
the same SDE over the same random weights, on this CPU.

  python experiments/bench_peer.py            # both sizes, table to experiments/results/bench_peer_cpu.md
  python experiments/bench_peer.py --quick    # the tiny size, 2 repeats, printed only

Ours: `policy.make_rollout_program`, the program the grpo stage runs (N SDE steps in one
`lax.scan`, the VAE decode of the scored latent, the finite flag), built as the stage builds it
from `configs/wan_tiny.py` pointed at a pipeline folder that diffusers / transformers write
here with random weights (`models/wan/tiny.py`, the transformer replaced by one of the row's
size): unguided (Flow-GRPO's Wan sampler, `flow_grpo_wan`) and guided (`:euphonium`: the Wan
PRM, its first block initialised from the base plus a random head, value and gradient on
steps 12-15). Batch 8 (1 prompt x group 8), 16 steps, no CFG, attention 'auto' (the
query-blocked one on CPU).
Peer: the same transformer folder loaded by diffusers (float32, `torch.no_grad`) and the same
VAE folder by `AutoencoderKLWan`, a plain loop of the same SDE step on the same grid
(`mean = x - dt (v + g^2 / (2 t) (x + (1 - t) v))`, `x' = mean + g sqrt(dt) xi`, the
log-prob) and the decode of the last clean estimate: the same work as ours, unguided, on
`torch.set_num_threads(1)` and `(2)` (under load torch's 2 threads oversubscribe: both shown).
Runs are interleaved (ours unguided, ours guided, torch 1 thread, torch 2 threads, per
repeat); medians and minima; ratios of medians.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from euphonium_jax import bundles, config as config_lib, parallel  # noqa: E402
from euphonium_jax import policy as policy_lib  # noqa: E402
from euphonium_jax.models.wan import tiny  # noqa: E402

STEPS, GROUP, TEXT_LEN = 16, 8, 16
SIZES = {  # name -> (latent H = W, transformer kwargs)
    "tiny": (16, dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2,
                      freq_dim=32)),
    "large": (32, dict(num_attention_heads=8, attention_head_dim=64, ffn_dim=2048,
                                num_layers=8, freq_dim=256)),
}


def write_folder(folder: str, kw: dict, seed: int = 0) -> str:
  import diffusers
  tiny.write_tiny_pipeline(folder, seed)
  torch.manual_seed(seed)
  diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16,
                                  text_dim=32, rope_max_seq_len=64, **kw).save_pretrained(
                                      os.path.join(folder, "transformer"))
  return folder


def make_config(folder: str, latent: int, guided: bool):
  path = os.path.join(ROOT, "configs", "wan_tiny.py") + (":euphonium" if guided else "")
  config = config_lib.from_file(path)
  config.wan.update(path=folder, frames=9, height=8 * latent, width=8 * latent)
  config.sampling.update(num_steps=STEPS, group_size=GROUP)
  config.grpo.update(prompts_per_iteration=1, samples_per_update=GROUP, cfg_scale=1.0)
  if guided:
    config.sampling.guidance.update(start=12)
  return config


def ours(folder: str, latent: int, guided: bool):
  """(call, policy) of the stage's rollout program at this size."""
  config = make_config(folder, latent, guided)
  mesh = parallel.mesh_from_config(config)
  nets = bundles.get(config)
  vae, _, model, _ = nets.load_networks(tempfile.mkdtemp(), mesh)
  model_g, model_p, model_r = model
  prm = nets.init_prm(model, seed=1) if guided else None
  pol = policy_lib.make_policy(config, nets, mesh, model_g, vae[0],
                               None if prm is None else prm[0])
  frozen, frozen_sh = policy_lib.frozen_inputs(vae, model_r, prm, mesh)
  program = policy_lib.make_rollout_program(pol, nets.model_param_shardings(mesh), frozen_sh)
  rng = np.random.default_rng(0)
  text = {"tokens": jnp.asarray(rng.standard_normal((1, TEXT_LEN, 32)).astype(np.float32)),
          "mask": jnp.ones((1, TEXT_LEN), bool)}
  args = (model_p, frozen, {"text": text}, jnp.zeros((pol.batch,), jnp.int32),
          jax.random.key(0))
  compiled = program.lower(*args).compile()
  z = jnp.zeros((pol.batch,) + pol.shape, jnp.float32)
  decode = jax.jit(pol.decode).lower(frozen["vae"], z).compile()
  return ((lambda: jax.block_until_ready(compiled(*args))), pol,
          (lambda: jax.block_until_ready(decode(frozen["vae"], z))))


def peer(folder: str, pol, latent: int):
  """The same SDE in a plain torch loop over diffusers' transformer and VAE."""
  import diffusers
  net = diffusers.WanTransformer3DModel.from_pretrained(os.path.join(folder, "transformer")).eval()
  vae = diffusers.AutoencoderKLWan.from_pretrained(os.path.join(folder, "vae")).eval()
  a = pol.arrs
  t, t_model, g = (np.asarray(x, np.float64) for x in (a.t, a.t_model, a.g))
  rng = np.random.default_rng(0)
  emb = torch.from_numpy(rng.standard_normal((1, TEXT_LEN, 32)).astype(np.float32)).expand(
      GROUP, -1, -1)
  shape = (GROUP, 16, 3, latent, latent)
  x0 = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
  noise = torch.from_numpy(rng.standard_normal((STEPS,) + shape).astype(np.float32))
  mean_z = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
  std_z = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)

  def decode():
    with torch.no_grad():
      return vae.decode(x0 * std_z + mean_z, return_dict=False)[0]

  def run():
    x, logps = x0, []
    with torch.no_grad():
      for i in range(STEPS):
        v = net(x, timestep=torch.full((GROUP,), 1000.0 * t_model[i]),
                encoder_hidden_states=emb, return_dict=False)[0]
        dt, gi, ti = t[i] - t[i + 1], g[i], t[i]
        x0_hat = x - ti * v
        mean = x - dt * (v + gi ** 2 / (2 * ti) * (x + (1 - ti) * v))
        std = gi * math.sqrt(dt)
        x = mean + std * noise[i]
        logps.append((-((x - mean) ** 2) / (2 * std ** 2) - math.log(std)
                      - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3, 4)))
      frames = vae.decode(x0_hat * std_z + mean_z, return_dict=False)[0]
    return frames, torch.stack(logps, 1)
  return run, decode


def timed(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def bench(name: str, latent: int, kw: dict, repeats: int) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    folder = write_folder(tmp, kw)
    un, pol, un_decode = ours(folder, latent, False)
    gu, _, _ = ours(folder, latent, True)
    torch_run, torch_decode = peer(folder, pol, latent)
    fns = {"ours unguided": un, "ours guided": gu, "torch 1 thread": (1, torch_run),
           "torch 2 threads": (2, torch_run), "ours decode": un_decode,
           "torch decode 1 thread": (1, torch_decode)}

    def call(f):
      if isinstance(f, tuple):
        torch.set_num_threads(f[0])
        return timed(f[1])
      return timed(f)
    for f in fns.values():  # warm-up
      call(f)
    times = {k: [] for k in fns}
    for _ in range(repeats):
      for k, f in fns.items():
        times[k].append(call(f))
  label = (f"{name} ({kw['num_attention_heads']} heads of {kw['attention_head_dim']}, "
           f"{kw['num_layers']} layers)")
  return dict(name=label, latent=latent, kw=kw, times=times)


def table(rows, command: str, repeats: int) -> str:
  med = statistics.median
  load = os.getloadavg()
  lines = [
      "# The Wan rollout against diffusers' WanTransformer3DModel (PyTorch), this CPU",
      "",
      f"`{command}`: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
      f"jax {jax.__version__}, torch {torch.__version__}; load average at the end "
      f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min; other sessions share "
      f"the cores). Batch {GROUP}, {STEPS} SDE steps, latent 16x3xHxW, VAE decode included on "
      f"both sides; {repeats} interleaved repeats, median (min) seconds; ratio = torch 1 "
      "thread median / ours.",
      "",
      "| size | latent | ours unguided | ours guided | torch 1 thread | torch 2 threads | "
      "torch1 / unguided | torch1 / guided | torch2 / unguided |",
      "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    t = r["times"]
    m = {k: med(v) for k, v in t.items()}
    cell = lambda k: f"{m[k]:.2f} ({min(t[k]):.2f})"
    lines.append(
        f"| {r['name']} | 16x3x{r['latent']}x{r['latent']} | {cell('ours unguided')} | "
        f"{cell('ours guided')} | {cell('torch 1 thread')} | {cell('torch 2 threads')} | "
        f"{m['torch 1 thread'] / m['ours unguided']:.2f} | "
        f"{m['torch 1 thread'] / m['ours guided']:.2f} | "
        f"{m['torch 2 threads'] / m['ours unguided']:.2f} |")
  lines += ["", "The VAE decode alone (part of both rows above), and the rollouts without it "
            "(row minus its decode), seconds (medians):", "",
            "| size | ours decode | torch decode 1 thread | ours unguided - decode | ours guided "
            "- decode | torch 1 thread - decode | torch1 / unguided | torch1 / guided |",
            "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    m = {k: med(v) for k, v in r["times"].items()}
    u, gd = m["ours unguided"] - m["ours decode"], m["ours guided"] - m["ours decode"]
    tt = m["torch 1 thread"] - m["torch decode 1 thread"]
    lines.append(f"| {r['name']} | {m['ours decode']:.2f} | {m['torch decode 1 thread']:.2f} | "
                 f"{u:.2f} | {gd:.2f} | {tt:.2f} | {tt / u:.2f} | {tt / gd:.2f} |")
  lines += ["", "Targets (issue 15): guided faster than torch's unguided (torch1 / guided > 1); "
            "unguided at least 3x faster (torch1 / unguided >= 3)."]
  for r in rows:
    m = {k: med(v) for k, v in r["times"].items()}
    g, u = m["torch 1 thread"] / m["ours guided"], m["torch 1 thread"] / m["ours unguided"]
    lines.append(f"- {r['name']}: guided {'met' if g > 1 else 'MISSED'} ({g:.2f}x), "
                 f"unguided {'met' if u >= 3 else 'MISSED'} ({u:.2f}x).")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="the tiny size, 2 repeats, printed only")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--sizes", default=",".join(SIZES))
  p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results",
                                               "bench_peer_cpu.md"))
  args = p.parse_args()
  names = ["tiny"] if args.quick else args.sizes.split(",")
  repeats = 2 if args.quick else args.repeats
  rows = []
  for n in names:
    rows.append(bench(n, *SIZES[n], repeats))
    print(f"[bench_peer] {n} done", file=sys.stderr, flush=True)
  text = table(rows, "python experiments/bench_peer.py" + "".join(f" {a}" for a in sys.argv[1:]),
               repeats)
  print(text)
  if args.out and not args.quick:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
