"""The embedded world: determinism, splits, captions, geometry and motion of the clips."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from euphonium_jax.data import world


def test_deterministic_by_key():
  a, attrs_a = world.sample_batch(jax.random.key(0), 8)
  b, attrs_b = world.sample_batch(jax.random.key(0), 8)
  c, _ = world.sample_batch(jax.random.key(1), 8)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(attrs_a), np.asarray(attrs_b))
  assert not np.allclose(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("frames,size", [(8, 32), (3, 24)])
def test_shapes_dtypes_range(frames, size):
  clips, attrs = world.sample_batch(jax.random.key(2), 8, "train", frames, size)
  assert clips.shape == (8, frames, size, size, 3) and clips.dtype == jnp.float32
  assert attrs.shape == (8, 3) and attrs.dtype == jnp.int32
  assert float(clips.min()) >= 0.0 and float(clips.max()) <= 1.0


def test_bad_geometry_raises():
  attrs = jnp.zeros((2, 3), jnp.int32)
  with pytest.raises(ValueError, match="frames must be"):
    world.sample_clips(jax.random.key(0), attrs, frames=1)
  with pytest.raises(ValueError, match="size must be"):
    world.sample_clips(jax.random.key(0), attrs, size=8)


def test_splits():
  train, held, every = world.combos("train"), world.combos("heldout"), world.combos("all")
  assert every.shape == (48, 3) and held.shape == (len(world.HELDOUT_COMBOS), 3)
  assert len(train) + len(held) == 48
  assert not set(map(tuple, train.tolist())) & set(map(tuple, held.tolist()))
  for column, vocab in enumerate((world.COLOURS, world.SHAPES, world.DIRECTIONS)):
    assert set(train[:, column].tolist()) == set(range(len(vocab)))
  sampled = np.asarray(world.sample_attrs(jax.random.key(3), 1024, "train"))
  assert not set(map(tuple, sampled.tolist())) & set(world.HELDOUT_COMBOS)
  sampled = np.asarray(world.sample_attrs(jax.random.key(4), 256, "heldout"))
  assert set(map(tuple, sampled.tolist())) == set(world.HELDOUT_COMBOS)


def test_bad_split_raises():
  with pytest.raises(ValueError, match=r"split must be one of \('train', 'heldout', 'all'\)"):
    world.combos("test")


def test_caption_round_trip_and_vocabulary():
  attrs = world.combos("all")
  texts = world.captions(attrs)
  assert texts[0] == "a red circle moving left"
  np.testing.assert_array_equal(world.parse_captions(texts), attrs)
  words = {w for t in texts for w in t.split()}
  assert words == set(world.vocabulary())


@pytest.mark.parametrize("bad", ["a purple circle moving left", "a red circle moving",
                                 "the red circle moving left", ""])
def test_bad_caption_raises(bad):
  with pytest.raises(ValueError, match="cannot parse caption"):
    world.parse_captions(["a red circle moving left", bad])


def test_object_stays_in_frame():
  attrs = world.combos("all")
  for frames, size in ((8, 32), (16, 16)):
    params = world.clip_params(jax.random.key(6), attrs, frames, size)
    lo = np.asarray(params["centre"] - params["half"])
    hi = np.asarray(params["centre"] + params["half"])
    assert lo.min() >= 0.0 and hi.max() <= size


def test_moves_in_captioned_direction():
  key = jax.random.key(7)
  attrs = world.combos("all")
  params = world.clip_params(key, attrs)
  clips = np.asarray(world.render(params))
  background = np.asarray(params["background"])[:, None]
  contrast = np.linalg.norm(np.asarray(params["colour"]) - background[:, 0, 0, 0], axis=-1)
  mask = np.linalg.norm(clips - background, axis=-1) / contrast[:, None, None, None]  # Coverage.
  coords = np.arange(32) + 0.5
  area = mask.sum((2, 3))
  assert area.min() > 10
  cx = (mask.sum(2) * coords).sum(-1) / area
  cy = (mask.sum(3) * coords).sum(-1) / area
  step = np.stack([np.diff(cx, axis=1), np.diff(cy, axis=1)], -1)  # [n, T-1, 2]
  direction = np.asarray(world.DIRECTION_VECTORS)[attrs[:, 2]][:, None]
  along = (step * direction).sum(-1)
  perp = np.abs((step * direction[..., ::-1]).sum(-1))
  assert along.min() > 0.5, "every step moves forward along the captioned direction"
  assert perp.max() < 0.1
  # Steady speed: each clip's steps agree (up to antialiasing of the coverage).
  assert np.abs(along - along.mean(1, keepdims=True)).max() < 0.1


def test_clips_vary():
  params = world.clip_params(jax.random.key(8), world.combos("all"))
  half = np.asarray(params["half"])[:, 0, 0]
  speed = np.linalg.norm(np.diff(np.asarray(params["centre"]), axis=1), axis=-1)[:, 0]
  assert half.min() >= 4.0 and half.max() <= 7.0 and half.std() > 0.5
  assert speed.min() >= 1.0 - 1e-5 and speed.max() <= 2.5 + 1e-5 and speed.std() > 0.2
