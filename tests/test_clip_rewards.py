"""The CLIP rewards (clip_score, pickscore, aesthetic) against transformers' CLIPModel +
CLIPImageProcessor and a numpy aesthetic head; their settings checks; one jitted program on
sharded frames; the aesthetic converter; a grpo smoke run against clip_score."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from euphonium_jax import config as config_lib  # noqa: E402
from euphonium_jax import checkpoint, main, parallel, report  # noqa: E402
from euphonium_jax.models.clip import aesthetic as aesthetic_lib, tiny  # noqa: E402
from euphonium_jax.rewards import clip as clip_rewards, registry  # noqa: E402
from conftest import use_tiny_world  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return tiny.write_tiny_clip(str(tmp_path_factory.mktemp("clip")), seed=3, aesthetic=True)


@pytest.fixture(scope="module")
def frames():
  return np.random.default_rng(0).uniform(size=(3, 5, 24, 40, 3)).astype(np.float32)


def reference_scores(folder, frames, prompts, kind, indices):
  """Independent path: uint8 frames -> CLIPImageProcessor (PIL) -> torch CLIPModel."""
  model = transformers.CLIPModel.from_pretrained(folder).eval()
  proc = transformers.CLIPImageProcessor.from_pretrained(folder)
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  b, k = frames.shape[0], len(indices)
  images = np.round(frames[:, list(indices)] * 255).astype(np.uint8).reshape(
      (b * k,) + frames.shape[2:])
  pixels = torch.tensor(proc(images=list(images), return_tensors="np")["pixel_values"])
  enc = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
  with torch.no_grad():
    img = model.get_image_features(pixel_values=pixels)
    txt = model.get_text_features(**enc)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
  img = (img / img.norm(dim=-1, keepdim=True)).numpy().astype(np.float64).reshape(b, k, -1)
  txt = (txt / txt.norm(dim=-1, keepdim=True)).numpy().astype(np.float64)
  cos = np.einsum("bkp,bp->bk", img, txt)
  if kind == "clip_score":  # torchmetrics: 100 * cosine, clipped at 0
    return np.maximum(100 * cos, 0).mean(1)
  if kind == "pickscore":
    return (model.logit_scale.exp().item() * cos).mean(1)
  from safetensors.numpy import load_file
  head = load_file(os.path.join(folder, "aesthetic", aesthetic_lib.FILENAME))
  return aesthetic_lib.numpy_reference(head, img.reshape(b * k, -1)).reshape(b, k).mean(1)


@pytest.mark.parametrize("kind,mode", [("clip_score", "all"), ("pickscore", "every"),
                                       ("aesthetic", "first")])
def test_rewards_match_the_reference(folder, frames, kind, mode):
  s = registry.settings(kind, path=folder, frames=mode, every=2)
  fn = registry.build(kind, s)
  got = np.asarray(fn(jnp.asarray(frames), PROMPTS))
  indices = clip_rewards.frame_indices(frames.shape[1], mode, 2)
  want = reference_scores(folder, frames, PROMPTS, kind, indices)
  assert got.shape == (3,) and got.dtype == np.float32
  # One-level flips of the 8-bit resampling (test_clip.py) are the only difference left.
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
  if kind == "clip_score":
    assert np.all(got >= 0)


def test_frame_modes_and_chunking(folder, frames):
  assert clip_rewards.frame_indices(8, "every", 3) == (0, 3, 6)
  assert clip_rewards.frame_indices(8, "first", 3) == (0,)
  assert clip_rewards.frame_indices(3, "all", 1) == (0, 1, 2)
  x = jnp.asarray(frames)
  whole = registry.build("pickscore", registry.settings("pickscore", path=folder, frames="all"))
  chunked = registry.build("pickscore", registry.settings("pickscore", path=folder,
                                                          frames="all", batch_size=4))
  np.testing.assert_allclose(np.asarray(chunked(x, PROMPTS)), np.asarray(whole(x, PROMPTS)),
                             rtol=1e-5, atol=1e-6)
  # The mean over frames is the mean of single-frame rewards.
  per_frame = [np.asarray(whole(x[:, t:t + 1], PROMPTS)) for t in (0, 1)]
  np.testing.assert_allclose(np.asarray(whole(x[:, :2], PROMPTS)), np.mean(per_frame, 0),
                             rtol=1e-5, atol=1e-6)


def test_one_program_on_sharded_frames(folder, frames):
  """8 forced devices: frames split over the batch give the single-device scores, from one
  compiled program with no host callback in it (the frames never leave the device)."""
  fn = clip_rewards.ClipReward.from_settings("clip_score", registry.settings(
      "clip_score", path=folder, frames="all", batch_size=6))
  mesh = parallel.make_mesh((-1, 1), ("data", "fsdp"))
  x = np.concatenate([frames] * 3)[:8]
  prompts = (PROMPTS * 3)[:8]
  sharded = parallel.shard_batch(jnp.asarray(x), mesh)
  assert len(sharded.sharding.device_set) == 8
  got = fn(sharded, prompts)
  np.testing.assert_allclose(np.asarray(got), np.asarray(fn(jnp.asarray(x), prompts)),
                             rtol=1e-5, atol=1e-5)
  rep, state = fn._state_for(sharded)
  ids = np.zeros((8, 16), np.int32)
  hlo = fn._program.lower(state, sharded, ids, ids, indices=(0, 1, 2, 3, 4)).as_text()
  assert "callback" not in hlo.lower()


def test_settings_are_checked(folder, tmp_path):
  problems = registry.check_settings("clip_score", registry.settings(
      "clip_score", path="", frames="middle", every=0, batch_size=-1))
  text = "\n".join(problems)
  for key, value in (("path", "''"), ("frames", "'middle'"), ("every", "0"),
                     ("batch_size", "-1")):
    assert f"config.rewards.clip_score.{key} = {value} is invalid" in text, text
  assert "first, every, all" in text
  missing = registry.check_settings("pickscore", registry.settings(
      "pickscore", path=str(tmp_path / "nowhere")))
  assert missing == [f"config.rewards.pickscore.path = {str(tmp_path / 'nowhere')!r} is "
                     "invalid: no such folder"]
  assert registry.check_settings("aesthetic", registry.settings("aesthetic", path=folder)) == []
  bad_head = registry.check_settings("aesthetic", registry.settings(
      "aesthetic", path=folder, head=str(tmp_path / "head.safetensors")))
  assert len(bad_head) == 1 and "config.rewards.aesthetic.head" in bad_head[0]
  # A config that trains against clip_score without a folder stops before compiling.
  c = config_lib.from_file(os.path.join(REPO, "configs", "clip_tiny.py"))
  c.rewards.clip_score.path = ""
  with pytest.raises(config_lib.ConfigError, match=r"config.rewards.clip_score.path = ''"):
    config_lib.validate(c)


def test_convert_aesthetic(tmp_path):
  import sys
  sys.path.insert(0, os.path.join(REPO, "tools"))
  import convert_aesthetic
  state = aesthetic_lib.random_torch_state_dict(768, seed=1)
  assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7)
                                 for p in ("weight", "bias"))
  torch.save(state, str(tmp_path / "head.pth"))
  out = str(tmp_path / "aesthetic.safetensors")
  assert convert_aesthetic.main([str(tmp_path / "head.pth"), out]) == 0
  head = aesthetic_lib.load_aesthetic(out, 768)
  x = np.random.default_rng(0).normal(size=(5, 768)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  with torch.no_grad():
    mlp = aesthetic_lib.torch_mlp(768).eval()
    mlp.load_state_dict({k[len("layers."):]: v for k, v in state.items()})
    want = mlp(torch.tensor(x))[:, 0].numpy()
  np.testing.assert_allclose(np.asarray(head(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aesthetic_lib.numpy_reference(
      {k: v.numpy() for k, v in state.items()}, x), want, rtol=1e-5, atol=1e-6)
  del state["layers.7.bias"]
  state["layers.8.weight"] = torch.zeros(1, 16)
  torch.save(state, str(tmp_path / "bad.pth"))
  with pytest.raises(ValueError, match=r"missing layers.7.bias; unexpected layers.8.weight"):
    convert_aesthetic.convert(str(tmp_path / "bad.pth"), str(tmp_path / "bad.safetensors"))


@pytest.mark.slow
def test_grpo_smoke_run_logs_clip_score(folder, tiny_init, tmp_path):
  """configs/clip_tiny.py on the tiny world's sizes (random nets): the grpo stage scores the
  decoded frames with the tiny CLIP and logs reward/clip_score each iteration."""
  c = use_tiny_world(config_lib.from_file(os.path.join(REPO, "configs", "clip_tiny.py")))
  c.sampling.update(num_steps=3, group_size=4)
  c.grpo.update(iterations=1, prompts_per_iteration=2, samples_per_update=8)
  c.eval.update(num_prompts=8, num_steps=2)  # the rollouts' batch: one CLIP program
  c.rewards.clip_score.path = folder
  c.init.pretrain = os.path.join(tiny_init, "pretrain")
  main.run(c, str(tmp_path / "run"))
  rows = [r for r in report.read_metrics(str(tmp_path / "run"), "grpo")
          if "reward/clip_score" in r]
  assert [r["step"] for r in rows] == [1]
  assert rows[0]["reward/clip_score"] >= 0 and np.isfinite(rows[0]["loss"])
  assert checkpoint.is_done(str(tmp_path / "run" / "grpo" / "final"))


def test_wan_pickscore_aesthetic_config(folder):
  c = config_lib.from_file(os.path.join(REPO, "configs", "wan2_1_t2v_1_3b.py:pickscore_aesthetic"))
  assert tuple(c.grpo.rewards) == (("pickscore", 1.0), ("aesthetic", 0.5))
  assert (c.rewards.pickscore.frames, c.rewards.pickscore.every) == ("every", 4)
  assert c.rewards.aesthetic.frames == "first"
  problems = registry.check_settings("pickscore", c.rewards.pickscore)
  assert len(problems) == 1 and problems[0].startswith("config.rewards.pickscore.path = ''")
  c.rewards.pickscore.path = c.rewards.aesthetic.path = folder
  assert registry.check_settings("pickscore", c.rewards.pickscore) == []
  assert registry.check_settings("aesthetic", c.rewards.aesthetic) == []
