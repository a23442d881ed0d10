"""Configurable rewards: factories registered with their settings' defaults, the settings in
`config.rewards.<name>` checked before anything compiles (every problem in one ConfigError
naming key, value and what is allowed), built once; plain rewards unchanged."""
import os

import numpy as np
import pytest
from ml_collections.config_flags import config_path

from euphonium_jax import config as config_lib
from euphonium_jax import main
from euphonium_jax.rewards import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("first", "every", "all")
BUILT = []  # (name, settings) of every build of the test factory


def _check(s):
  p = []
  if not os.path.isdir(s.path):
    p.append(f"config.rewards.test_folder_reward.path = {s.path!r} is invalid: a folder "
             "with the weights is required")
  if s.frames not in MODES:
    p.append(f"config.rewards.test_folder_reward.frames = {s.frames!r} is invalid: allowed "
             f"values are {', '.join(map(repr, MODES))}")
  return p


@registry.register_factory("test_folder_reward", check=_check,
                           defaults={"path": "", "frames": "first", "every": 4, "scale": 1.0})
def _folder_reward(settings):
  BUILT.append(dict(settings))
  scale = settings.scale

  def fn(frames, prompts):
    return scale * np.asarray(frames, np.float32)[:, 0].mean((1, 2, 3))

  return fn


def grpo_config(**rewards):
  c = config_lib.get_default_config()
  c.stages = ("grpo",)
  c.init.pretrain = "assets/embedded"
  c = config_lib.as_baseline(c, "dance_grpo")
  c.grpo.rewards = tuple(rewards.items())
  return c


def _error(c) -> str:
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, num_devices=8)
  return str(e.value)


def test_defaults_fill_the_rewards_section_and_the_cli_can_set_them():
  c = config_lib.get_default_config()
  for name in registry.factory_names():
    assert c.rewards[name].to_dict() == registry.default_settings(name).to_dict()
  assert c.rewards.test_folder_reward.to_dict() == {"path": "", "frames": "first", "every": 4,
                                                   "scale": 1.0}
  config_path.set_value("rewards.test_folder_reward.path", c, "/x")  # what --config.* does
  config_path.set_value("rewards.remote.url", c, "http://127.0.0.1:8000")
  assert c.rewards.test_folder_reward.path == "/x"
  assert c.rewards.remote.url == "http://127.0.0.1:8000"


def test_missing_folder_unknown_mode_and_unknown_key_in_one_error(tmp_path):
  c = grpo_config(test_folder_reward=1.0, remote=0.5)
  c.rewards.test_folder_reward.path = str(tmp_path / "nowhere")
  c.rewards.test_folder_reward.frames = "odd"
  c.rewards.remote.url = "http://127.0.0.1:1"
  with c.rewards.remote.unlocked():
    c.rewards.remote.timeout = 3.0
  msg = _error(c)
  lines = msg.splitlines()
  assert lines[0] == "the reward settings cannot run:"
  assert (f"config.rewards.test_folder_reward.path = '{tmp_path / 'nowhere'}' is invalid: a "
          "folder with the weights is required") in msg
  assert ("config.rewards.test_folder_reward.frames = 'odd' is invalid: allowed values are "
          "'first', 'every', 'all'") in msg
  assert ("config.rewards.remote.timeout is an unknown key: the settings of 'remote' are "
          "backoff_s, batch_size, every, frames, health_check, max_in_flight, retries, "
          "timeout_s, url") in msg
  assert len(lines) == 4, msg
  # The same config through main.run: refused before any stage starts (nothing written).
  workdir = tmp_path / "w"
  with pytest.raises(config_lib.ConfigError, match="reward settings cannot run"):
    main.run(c, str(workdir))
  assert not workdir.exists()
  # Fixed, it validates; the remote server is not contacted by validation.
  c.rewards.test_folder_reward.update(path=str(tmp_path), frames="all")
  del c.rewards.remote["timeout"]
  config_lib.validate(c, num_devices=8)


def test_wrong_types_and_nonfinite_settings_are_named():
  c = grpo_config(remote=1.0)
  c.rewards.remote.url = "http://127.0.0.1:1"
  with c.rewards.remote.ignore_type():  # a file may build the section from a plain dict
    c.rewards.remote.retries = "two"
  msg = _error(c)
  assert "config.rewards.remote.retries = 'two' is invalid: expected type int, got str" in msg
  with c.rewards.remote.ignore_type():
    c.rewards.remote.retries = 1
  c.rewards.remote.timeout_s = float("inf")
  assert ("config.rewards.remote.timeout_s = inf is invalid: every number must be finite"
          in _error(c))
  c.rewards.remote.timeout_s = 0.0
  assert "config.rewards.remote.timeout_s = 0.0 is invalid: must be > 0 (seconds)" in _error(c)


def test_settings_of_an_unused_reward_are_checked_for_keys_only():
  c = grpo_config(jpeg_compressibility=1.0)
  config_lib.validate(c, num_devices=8)  # test_folder_reward's empty path: not used, fine
  with c.rewards.test_folder_reward.unlocked():
    c.rewards.test_folder_reward.pth = "/x"
  assert "config.rewards.test_folder_reward.pth is an unknown key" in _error(c)


def test_several_remote_rewards_by_label():
  c = grpo_config(remote_judge=1.0, remote_aesthetic=0.5)
  msg = _error(c)
  for label in ("judge", "aesthetic"):
    assert (f"config.grpo.rewards names 'remote_{label}', which needs settings: add "
            f"config.rewards.remote_{label} = registry.settings('remote', ...)") in msg
  c.rewards.remote_judge = registry.settings("remote", url="http://127.0.0.1:1")
  c.rewards.remote_aesthetic = registry.settings("remote", url="ftp://x", frames="every")
  msg = _error(c)
  assert "config.rewards.remote_aesthetic.url = 'ftp://x' is invalid" in msg
  assert "remote_judge" not in msg
  c.rewards.remote_aesthetic.url = "http://127.0.0.1:2"
  config_lib.validate(c, num_devices=8)
  c.rewards.judge = registry.settings("remote", url="http://127.0.0.1:1")
  assert ("config.rewards.judge is not a reward: the configurable rewards are" in _error(c))


def test_evaluate_and_prm_reward_names():
  c = config_lib.get_default_config()
  c.stages = ("evaluate",)
  c.init.pretrain = "assets/embedded"
  c.evaluate.rewards = ("shapes_fidelity", "nope")
  assert "config.evaluate.rewards names 'nope', which is not a registered reward" in _error(c)
  c.evaluate.rewards = ("test_folder_reward",)
  assert "config.rewards.test_folder_reward.path = '' is invalid" in _error(c)
  c.stages = ("vae", "pretrain", "prm")
  c.prm.reward = "remote"
  assert ("config.prm.reward = 'remote' is invalid: the prm stage labels its rollouts with a "
          "plain reward") in _error(c)


def test_build_uses_settings_over_defaults_once_and_plain_rewards_are_unchanged(tmp_path):
  BUILT.clear()
  s = registry.settings("test_folder_reward", path=str(tmp_path), scale=2.0)
  built = registry.build_many(["test_folder_reward", "prm_final", "jpeg_compressibility",
                               "test_folder_reward"], {"test_folder_reward": s})
  assert list(built) == ["test_folder_reward", "jpeg_compressibility"] and len(BUILT) == 1
  assert BUILT[0] == {"path": str(tmp_path), "frames": "first", "every": 4, "scale": 2.0}
  x = np.random.default_rng(0).random((3, 2, 8, 8, 3), np.float32)
  got = registry.score(built["test_folder_reward"], x, ["a"] * 3)
  np.testing.assert_allclose(got, 2.0 * x[:, 0].mean((1, 2, 3)), rtol=1e-6)
  assert built["jpeg_compressibility"] is registry.get("jpeg_compressibility")
  np.testing.assert_array_equal(registry.score("jpeg_compressibility", x, ["a"] * 3),
                                registry.score(built["jpeg_compressibility"], x, ["a"] * 3))
  with pytest.raises(ValueError, match=r"reward 'test_folder_reward' is configurable: build"):
    registry.call("test_folder_reward", x, ["a"] * 3)
  with pytest.raises(ValueError, match=r"path = '' is invalid"):
    registry.build("test_folder_reward")  # defaults alone: no folder
  with pytest.raises(ValueError, match=r"has no settings \['pth'\]"):
    registry.settings("test_folder_reward", pth="/x")


def test_a_failing_built_reward_is_named_and_the_wrong_shape_too(tmp_path):
  def broken(frames, prompts):
    raise OSError("the judge is offline")

  with pytest.raises(registry.RewardError, match=r"\[grpo\] the outcome reward 'broken' "
                     r"raised OSError: the judge is offline"):
    registry.score(broken, np.zeros((2, 1, 4, 4, 3)), ["a", "b"])
  s = registry.settings("test_folder_reward", path=str(tmp_path))
  fn = registry.build("test_folder_reward", s)
  with pytest.raises(registry.RewardError, match=r"'test_folder_reward' returned shape \(3,\), "
                     r"expected \(2,\)"):
    registry.score(fn, np.zeros((3, 1, 4, 4, 3)), ["a", "b"])
  # A plain reward is named as it was registered, not by its Python function's name.
  if not registry.is_known("test_judge_reward"):
    registry.register("test_judge_reward")(broken)
  built = registry.build_many(["shapes_fidelity", "test_judge_reward"])
  with pytest.raises(registry.RewardError, match=r"the outcome reward 'test_judge_reward' "
                     r"raised OSError"):
    registry.score_many(built, np.zeros((2, 2, 16, 16, 3), np.float32),
                        ["a red circle moving left"] * 2)


def test_register_refuses_a_second_reward_and_names_that_are_not_identifiers():
  with pytest.raises(ValueError, match="reward 'jpeg_compressibility' is already registered"):
    registry.register("jpeg_compressibility")(lambda f, p: p)
  with pytest.raises(ValueError, match="must be a Python identifier"):
    registry.register_factory("my:reward", defaults={})(lambda s: None)
  assert registry.base_name("remote_judge") == "remote"
  assert registry.base_name("remote_") is None and registry.base_name("jpeg_x") is None
  assert registry.is_io_bound("remote_judge") and not registry.is_io_bound("shapes_fidelity")
