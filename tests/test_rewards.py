"""The shapes_fidelity reward: ground truth scores high, every corruption lowers it, gradually;
and JPEG compressibility."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from euphonium_jax import rewards
from euphonium_jax.data import corrupt, world
from euphonium_jax.rewards import registry, shapes

N_TRAIN, N_HELDOUT = 48, 16


@pytest.fixture(scope="module")
def clean():
  """64 clips (48 train + 16 held-out), their geometry and attributes."""
  k_train, k_held, k_clips = jax.random.split(jax.random.key(0), 3)
  attrs = jnp.concatenate([world.sample_attrs(k_train, N_TRAIN, "train"),
                           world.sample_attrs(k_held, N_HELDOUT, "heldout")])
  params = world.clip_params(k_clips, attrs)
  return params, attrs, world.render(params)


def _score(frames, attrs) -> float:
  return float(shapes.shapes_fidelity_attrs(frames, attrs).mean())


def test_ground_truth_scores_high(clean):
  _, attrs, frames = clean
  scores = np.asarray(shapes.shapes_fidelity_attrs(frames, attrs))
  assert scores[:N_TRAIN].mean() >= 0.9 and scores[N_TRAIN:].mean() >= 0.9
  assert scores.min() >= 0.5
  components = shapes.shapes_fidelity_components(frames, attrs)
  for name in ("colour", "shape", "motion", "background"):
    assert float(components[name].mean()) >= 0.95, name


def _graded(name, clean):
  """Mean score of the clean clips, then of each strength of corruption `name`."""
  params, attrs, frames = clean
  make = {
      "recolour": ((0.2, 0.4, 0.7), lambda s: world.render(corrupt.recolour(params, attrs, s))),
      "melt": ((0.25, 0.5, 1.0), lambda s: world.render(corrupt.melt(params, s))),
      "jitter": ((0.25, 0.5, 1.0),
                 lambda s: world.render(corrupt.jitter(jax.random.key(1), params, s))),
      "freeze": ((0.15, 0.5, 1.0), lambda s: corrupt.freeze(frames, s)),
      "turn": ((30.0, 90.0, 180.0), lambda s: world.render(corrupt.turn(params, s))),
      "noise": ((0.03, 0.06, 0.1), lambda s: corrupt.add_noise(jax.random.key(2), frames, s)),
      "blob": ((2.0, 3.0, 5.0), lambda s: corrupt.add_blob(jax.random.key(3), frames, s)),
  }
  strengths, fn = make[name]
  return [_score(frames, attrs)] + [_score(fn(s), attrs) for s in strengths]


@pytest.mark.parametrize("name", ["recolour", "melt", "jitter", "freeze", "turn", "noise", "blob"])
def test_corruption_lowers_score_more_as_it_grows(name, clean):
  scores = _graded(name, clean)
  assert all(a > b for a, b in zip(scores, scores[1:])), (name, scores)
  assert scores[-1] < 0.1, (name, scores)


def test_opposite_direction_scores_low(clean):
  _, attrs, _ = clean
  flipped = world.sample_clips(jax.random.split(jax.random.key(0), 3)[2],
                               corrupt.flip_direction(attrs))
  assert _score(flipped, attrs) < 0.05


def test_wrong_shape_scores_low(clean):
  _, attrs, _ = clean
  key = jax.random.split(jax.random.key(0), 3)[2]
  for step in (1, 2):  # ~0.13 with FILL_TOL = 0.12 (0.02 with 0.08); ground truth ~0.96
    assert _score(world.sample_clips(key, corrupt.other_shape(attrs, step)), attrs) < 0.2


def test_noise_black_and_grey_videos_score_low(clean):
  _, attrs, frames = clean
  assert _score(jax.random.uniform(jax.random.key(4), frames.shape), attrs) <= 0.2
  assert _score(jnp.zeros_like(frames), attrs) <= 0.05
  assert _score(jnp.full_like(frames, 0.5), attrs) <= 0.05


def test_scores_in_unit_interval(clean):
  _, attrs, frames = clean
  noisy = corrupt.add_noise(jax.random.key(5), frames, 0.3)
  for x in (frames, noisy):
    s = np.asarray(shapes.shapes_fidelity_attrs(x, attrs))
    assert s.dtype == np.float32 and s.shape == (N_TRAIN + N_HELDOUT,)
    assert s.min() >= 0.0 and s.max() <= 1.0


def test_vocabulary_and_palette_agree_with_world():
  assert shapes.COLOURS == world.COLOURS and shapes.SHAPES == world.SHAPES
  assert shapes.DIRECTIONS == world.DIRECTIONS
  assert shapes.DIRECTION_VECTORS == world.DIRECTION_VECTORS
  np.testing.assert_allclose(np.asarray(shapes.PALETTE), world.palette())


def test_registry_prompts_path_matches_attrs(clean):
  _, attrs, frames = clean
  fn = rewards.get("shapes_fidelity")
  assert fn is shapes.shapes_fidelity and "shapes_fidelity" in registry.names()
  np.testing.assert_allclose(np.asarray(fn(frames, world.captions(attrs))),
                             np.asarray(shapes.shapes_fidelity_attrs(frames, attrs)), rtol=1e-6)


def test_registry_errors(clean):
  _, attrs, frames = clean
  with pytest.raises(ValueError, match=r"unknown reward 'nope'; known rewards: \[.*shapes_fidelity"):
    registry.get("nope")
  with pytest.raises(ValueError, match="already registered"):
    registry.register("shapes_fidelity")(lambda frames, prompts: frames)
  with pytest.raises(ValueError, match="cannot parse prompt 'a red dog moving left'"):
    shapes.shapes_fidelity(frames[:1], ["a red dog moving left"])
  with pytest.raises(ValueError, match="got 2 clips but 1 prompts"):
    shapes.shapes_fidelity(frames[:2], world.captions(attrs[:1]))


def test_gradient_is_finite(clean):
  _, attrs, frames = clean
  grad = jax.grad(lambda x: shapes.shapes_fidelity_attrs(x, attrs[:8]).sum())
  for x in (frames[:8], jnp.zeros_like(frames[:8]), frames[:8, :1].repeat(8, 1)):
    assert bool(jnp.isfinite(grad(x)).all())


def test_jpeg_compressibility_prefers_flat_frames():
  import io

  from PIL import Image

  rng = np.random.default_rng(0)
  flat = np.full((1, 3, 16, 16, 3), 0.5, np.float32)
  noise = rng.uniform(size=(1, 3, 16, 16, 3)).astype(np.float32)
  r = np.asarray(rewards.get("jpeg_compressibility")(np.concatenate([flat, noise]), ["", ""]))
  assert r.shape == (2,) and r[0] > r[1]
  # Independent: minus the mean JPEG size (quality 95) of the noise frames, in kB.
  sizes = []
  for f in noise[0]:
    buf = io.BytesIO()
    Image.fromarray((f * 255 + 0.5).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    sizes.append(buf.tell() / 1000)
  assert r[1] == pytest.approx(-np.mean(sizes), rel=1e-6)
