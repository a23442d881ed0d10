"""Every bad input is one line naming the key or path, the problem and what to do (issue 13).

Config numbers finite and in range, every stage's batch divisibility before anything runs;
the Wan loader's one error for every fault of every file; the PRM cache manifest; the
command line's workdir and unknown keys; no fork-deadlock warning, no transformers banner.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from euphonium_jax import config as config_lib
from euphonium_jax import main as main_lib
from euphonium_jax.data import rollout_cache
from euphonium_jax.models.wan import loading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INF, NAN = float("inf"), float("nan")


def _tiny():
  return config_lib.from_file(os.path.join(REPO, "configs", "tiny.py"))


def _set(c, key, value):
  node = c
  parts = key.split(".")
  for p in parts[:-1]:
    node = node[p]
  with node.ignore_type():
    node[parts[-1]] = value
  return c


def _error(c, num_devices=8) -> str:
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, num_devices=num_devices)
  return str(e.value)


# ------------------------------------------------------------------ 4. Config numbers


@pytest.mark.parametrize("key, value", [
    ("sampling.shift", INF), ("sampling.eta", NAN), ("sampling.guidance.beta", INF),
    ("sampling.guidance.scale", INF), ("grpo.lr", INF), ("grpo.weight_decay", INF),
    ("grpo.kl_coef", NAN), ("pretrain.lr", NAN), ("eval.shift", INF), ("prm.data.eta", INF),
    ("grpo.rewards", (("shapes_fidelity", INF),)), ("sampling.grid", (1.0, NAN, 0.0)),
])
def test_non_finite_numbers_are_refused(key, value):
  msg = _error(_set(_tiny(), key, value))
  assert msg.startswith(f"config.{key} = ") and "every number must be finite" in msg, msg


def test_number_helpers_require_finite_values():
  c = config_lib.get_default_config()
  for value in (INF, NAN):
    c.pretrain.lr = value
    with pytest.raises(config_lib.ConfigError, match=r"config.pretrain.lr = (inf|nan) is "
                       r"invalid: must be > 0 \(and finite\)"):
      config_lib._positive(c, ["pretrain.lr"])
    c.pretrain.weight_decay = value
    with pytest.raises(config_lib.ConfigError, match=r"must be >= 0 \(and finite\)"):
      config_lib._non_negative(c, ["pretrain.weight_decay"])
    c.pretrain.ema_decay = value
    with pytest.raises(config_lib.ConfigError, match=r"must be in \[0.0, 1.0\)"):
      config_lib._in_range(c, "pretrain.ema_decay", 0.0, 1.0, inclusive_hi=False)


@pytest.mark.parametrize("key, value", [("grpo.b1", 1.0), ("grpo.b2", 1.0), ("grpo.b1", -0.1)])
def test_adam_betas_in_unit_interval(key, value):
  assert f"config.{key} = {value} is invalid: must be in [0.0, 1.0)" in _error(
      _set(_tiny(), key, value))


@pytest.mark.parametrize("stages, key, value, n", [
    (("vae", "pretrain"), "pretrain.batch_size", 12, 12),
    (("vae", "pretrain"), "vae_train.batch_size", 12, 12),
    (("vae", "pretrain", "prm"), "prm.batch_size", 12, 12),
    (("vae", "pretrain", "prm"), "prm.data.chunk_prompts", 3, 12),  # x group_size 4
])
def test_every_stage_batch_checked_before_anything_runs(stages, key, value, n):
  c = _set(_tiny(), key, value)
  c.stages = stages
  c.prm.data.num_prompts = 12
  msg = _error(c)
  assert msg.startswith(f"config.{key} = {value} is invalid: gives {n} ") and (
      "divisible by the data-parallel size 8 (mesh (-1, 1) on 8 devices)" in msg), msg
  config_lib.validate(c, num_devices=4)  # 12 splits over 4 devices
  c.stages = ("sample",)  # a stage that is not run is not checked
  c.init.pretrain = "assets/embedded"
  config_lib.validate(c, num_devices=8)


# ------------------------------------------------------------------ 6. The Wan loader


class _Blocks(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.zeros((3, 5, 4)))  # 3 stacked layers of a linear [out 4, in 5]
    self.v = nnx.Param(jnp.zeros((3, 4)))


class _Tiny(nnx.Module):
  def __init__(self):
    self.blocks = _Blocks()
    self.head = nnx.Linear(4, 2, rngs=nnx.Rngs(0))


_RULES = (loading.Rule(r"blocks\.(?P<layer>\d+)\.w", "blocks/w", "linear"),
          loading.Rule(r"blocks\.(?P<layer>\d+)\.v", "blocks/v"),
          loading.Rule(r"head\.weight", "head/kernel", "linear"),
          loading.Rule(r"head\.bias", "head/bias"))


def _tensors():
  t = {f"blocks.{i}.w": np.full((4, 5), i, np.float32) for i in range(3)}
  t.update({f"blocks.{i}.v": np.full((4,), i, np.float32) for i in range(3)})
  t.update({"head.weight": np.ones((2, 4), np.float32), "head.bias": np.zeros(2, np.float32)})
  return t


def _write_sharded(folder, tensors):
  """Two shards and their index, as diffusers writes large models."""
  os.makedirs(folder, exist_ok=True)
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
  for shard, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, os.path.join(folder, shard))
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": {k: s for s, ks in shards.items() for k in ks}}, f)
  return str(folder)


def _abstract():
  return nnx.state(nnx.eval_shape(_Tiny))


def test_loader_names_every_fault_of_every_file(tmp_path):
  t = _tensors()
  good = loading.load_state(_abstract(), loading.open_folder(_write_sharded(tmp_path / "ok", t)),
                            _RULES)
  np.testing.assert_array_equal(good["blocks"]["w"][...][2], np.full((5, 4), 2.0))
  t["blocks.1.ww"] = t.pop("blocks.1.w")  # renamed inside the stack
  t["blocks.2.v"] = np.zeros((5,), np.float32)  # reshaped inside another stack
  t["head.weight"] = np.ones((2, 4), np.int32)  # wrongly typed
  del t["head.bias"]  # missing
  t["extra.weight"] = np.zeros(3, np.float32)  # unexpected
  folder = _write_sharded(tmp_path / "bad", t)
  with pytest.raises(loading.WeightsError) as e:
    loading.load_state(_abstract(), loading.open_folder(folder), _RULES)
  msg = str(e.value)
  assert msg.startswith(f"weights in {folder} do not fit the model; ") and "\n" not in msg
  assert "blocks/w: layers [1] (the weights have [0, 2])" in msg
  assert "unexpected reference tensors (2)" in msg and "'blocks.1.ww'" in msg
  assert "'extra.weight'" in msg
  assert "blocks/v: layers differ in shape: blocks.2.v (5,); the model's layers are (4,)" in msg
  assert "head.weight in model-00002-of-00002.safetensors: dtype I32, head/kernel needs" in msg
  assert "missing from the weights (2)" in msg and "'head/bias'" in msg

  class Plain:  # a reader without header information: the data path names every fault too
    def __init__(self, reader):
      self.r = reader

    def keys(self):
      return self.r.keys()

    def __getitem__(self, name):
      return self.r[name]

  with pytest.raises(loading.WeightsError) as e:
    loading.load_state(_abstract(), Plain(loading.open_folder(folder)), _RULES)
  plain = str(e.value)
  for needle in ("blocks/w: layers [1]", "'blocks.1.ww'", "blocks/v: layers differ",
                 "head.weight in ", "dtype I32", "'head/bias'"):
    assert needle in plain, (needle, plain)


def test_truncated_safetensors_file_is_named(tmp_path):
  folder = _write_sharded(tmp_path / "w", _tensors())
  shard = os.path.join(folder, "model-00002-of-00002.safetensors")
  assert set(loading.check_headers(folder)) == set(_tensors())
  data = open(shard, "rb").read()
  with open(shard, "wb") as f:
    f.write(data[:-10])
  want = (f"{shard}: truncated: the header places tensor data up to byte {len(data)}, the "
          f"file has {len(data) - 10} bytes; re-download it")
  for call in (loading.check_headers, loading.open_folder):
    with pytest.raises(loading.WeightsError) as e:
      call(folder)
    assert want in str(e.value), str(e.value)
  with open(shard, "wb") as f:
    f.write(data[:5])
  with pytest.raises(loading.WeightsError, match="truncated or not a safetensors file "
                     r"\(5 bytes, shorter than the 8-byte header length\)"):
    loading.check_headers(folder)
  os.remove(shard)
  with pytest.raises(loading.WeightsError, match="names shards that are missing"):
    loading.check_headers(folder)


# ------------------------------------------------------------------ 7. The PRM cache


def _make(i):
  return {"x": np.full((2, 3), i, np.float32)}


class _Counting:
  def __init__(self):
    self.calls = []

  def __call__(self, i):
    self.calls.append(i)
    return _make(i)


def _load(d, fp, maker):
  return rollout_cache.load_or_make(str(d), fp, 3, maker, keys=("x",), progress=False)


@pytest.mark.parametrize("damage", ["unreadable", "lost"])
def test_lost_manifest_is_rebuilt_from_the_chunks(tmp_path, capsys, damage):
  _load(tmp_path, "fp1", _Counting())
  manifest = tmp_path / rollout_cache.MANIFEST
  if damage == "unreadable":
    manifest.write_text('{"fingerprint": "fp')  # torn
  else:
    manifest.unlink()
  maker = _Counting()
  out = _load(tmp_path, "fp1", maker)
  assert maker.calls == [] and float(out["x"][4, 0]) == 2.0  # every chunk kept
  printed = capsys.readouterr().out
  assert "different base model" not in printed
  if damage == "unreadable":
    assert f"{manifest} is unreadable (JSONDecodeError" in printed
    assert "rebuilding it from the chunks' own fingerprints" in printed
  assert json.loads(manifest.read_text())["fingerprint"] == "fp1"
  # A chunk of another fingerprint is still replaced, and named for what it is.
  rollout_cache.write_chunk(str(tmp_path), 1, _make(7), "fp0")
  manifest.unlink()
  maker = _Counting()
  _load(tmp_path, "fp1", maker)
  assert maker.calls == [1]
  assert "1 chunk(s) in" in capsys.readouterr().out


def test_manifest_write_is_atomic(tmp_path, monkeypatch):
  _load(tmp_path, "fp1", _Counting())
  manifest = tmp_path / rollout_cache.MANIFEST
  before = manifest.read_text()

  def torn_dump(value, f, **kw):
    f.write('{"fingerprint": ')
    raise KeyboardInterrupt  # killed mid-write

  monkeypatch.setattr(rollout_cache.json, "dump", torn_dump)
  with pytest.raises(KeyboardInterrupt):
    _load(tmp_path, "fp2", _Counting())
  assert manifest.read_text() == before


# ------------------------------------------------------------------ 8. The command line


def test_workdir_errors(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  assert main_lib.workdir_error(str(afile)) == (
      f"--workdir={afile} is a file, not a directory: give a directory (one that does not "
      "exist yet is created)")
  assert main_lib.workdir_error(str(afile / "sub" / "dir")) == (
      f"--workdir={afile / 'sub' / 'dir'} is under {afile}, which is a file, not a directory: "
      "give a path whose parents are directories")
  fresh = tmp_path / "new" / "run"
  assert main_lib.workdir_error(str(fresh)) is None
  assert not (tmp_path / "new").exists()  # the probe leaves nothing behind
  if os.geteuid() == 0:
    unwritable = "/sys/euphonium_workdir_probe"  # not even root may create a directory there
  else:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    unwritable = str(ro / "run")
  msg = main_lib.workdir_error(unwritable)
  assert msg.startswith(f"--workdir={unwritable} is not writable (") and msg.endswith(
      "): give a directory you can write to, or change its permissions"), msg


def test_unknown_cli_key_names_the_close_match():
  assert main_lib.override_error(["main", "--config.grpo.lrr=1"]) == (
      "--config.grpo.lrr=1: config.grpo has no key 'lrr'; did you mean --config.grpo.lr?")
  assert main_lib.override_error(["main", "--config.grpoo.lr", "1"]) == (
      "--config.grpoo.lr: config has no key 'grpoo'; did you mean --config.grpo?")
  assert main_lib.override_error(["main", "--config.grpo.lr.x=1"]).startswith(
      "--config.grpo.lr.x=1: config.grpo.lr is a setting (float), not a group of settings")
  assert main_lib.override_error(["main", "--config.grpo.lr=2"]) is None


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
  """main() as the command line runs it: each bad input is one line on stderr, exit status 2."""
  from absl import flags, logging
  from euphonium_jax import checkpoint
  afile = tmp_path / "afile"
  afile.write_text("x")
  tiny = os.path.join(REPO, "configs", "tiny.py")

  def damaged(config, workdir):
    raise checkpoint.CheckpointError(f"{workdir}/pretrain/final holds no intact checkpoint: "
                                     "_METADATA is missing; re-run the pretrain stage")

  cases = [(["--workdir", str(tmp_path / "w"), "--config.grpo.lrr=1"], None,
            "error: --config.grpo.lrr=1: config.grpo has no key 'lrr'; did you mean "
            "--config.grpo.lr?"),
           (["--workdir", str(afile)], None, f"error: --workdir={afile} is a file"),
           (["--workdir", str(tmp_path / "w")], damaged,
            f"error: {tmp_path / 'w'}/pretrain/final holds no intact checkpoint")]
  monkeypatch.setenv("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")  # main() sets it; restored after
  verbosity = logging.get_verbosity()
  try:
    for args, run, want in cases:
      argv = ["euphonium_jax.main", "--config", tiny] + args
      monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads its overrides there
      if run is not None:
        monkeypatch.setattr(main_lib, "run", run)
      with pytest.raises(SystemExit) as e:
        main_lib.parse_flags(argv)
        main_lib.main([])
      lines = capsys.readouterr().err.strip().splitlines()
      assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith(want), lines
      flags.FLAGS.unparse_flags()
  finally:
    flags.FLAGS.unparse_flags()
    logging.set_verbosity(verbosity)


def test_a_run_prints_no_fork_warning_and_no_transformers_banner(tmp_path):
  """In a process with JAX's threads running and no torch (a plain install): the tokenizer
  prints no "PyTorch was not found" banner, and the MP4 writer starts ffmpeg with no fork
  that runs Python code in the child (no at-fork handler runs: JAX's deadlock warning is
  one), once main()'s setting is made. Both detectors are shown to work in the same run."""
  script = textwrap.dedent(f"""
      import importlib.util, os, subprocess, sys
      real = importlib.util.find_spec  # a plain install: no torch
      importlib.util.find_spec = lambda n, *a, **k: (
          None if n.split(".")[0] == "torch" else real(n, *a, **k))
      forks = []
      os.register_at_fork(before=lambda: forks.append(1))
      import jax.numpy as jnp
      jnp.ones(3).block_until_ready()  # JAX's threads are running
      from euphonium_jax import main
      from euphonium_jax.models import text
      text.build_tokenizer(["red", "circle"])
      import transformers
      assert not transformers.utils.is_torch_available()  # the banner's condition holds
      main.start_subprocesses_without_fork()  # what main() does first
      import imageio.v2 as imageio
      import numpy as np
      with imageio.get_writer({str(tmp_path / 'v.mp4')!r}, fps=4, codec="libx264",
                              macro_block_size=1, ffmpeg_log_level="error") as w:
        w.append_data(np.zeros((16, 16, 3), np.uint8))
      print("forks", len(forks))
      subprocess.run(["true"], preexec_fn=lambda: None)  # what imageio-ffmpeg did before
      print("forks", len(forks), flush=True)
  """)
  env = {k: v for k, v in os.environ.items()
         if k not in ("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        env=dict(env, JAX_PLATFORMS="cpu"), timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "PyTorch was not found" not in proc.stdout + proc.stderr, proc.stderr
  assert proc.stdout.split("\n")[:2] == ["forks 0", "forks 1"], proc.stdout
  warnings = [l for l in proc.stderr.splitlines() if "os.fork() was called" in l]
  assert len(warnings) == 1 and "preexec_fn" not in proc.stderr.split(warnings[0])[0], (
      proc.stderr)  # only the deliberate fork at the end warned
