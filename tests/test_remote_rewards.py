"""Remote rewards against real server processes on the loopback address: the round trip
equals local scoring; a server that dies, hangs past the timeout or answers wrongly gives
a named failure; several remote rewards are scored concurrently; a grpo run whose server dies
stops naming it, at its last verified checkpoint."""
import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from euphonium_jax.rewards import registry, remote
from conftest import use_tiny_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(*args):
  """A `python -m euphonium_jax.rewards.serve` process on a free port: (process, url)."""
  proc = subprocess.Popen(
      [sys.executable, "-m", "euphonium_jax.rewards.serve", "--port", "0", *args],
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
  return proc


def url_of(proc) -> str:
  line = proc.stdout.readline()
  m = re.search(r"http://\S+", line)
  assert m, f"the server printed {line!r}"
  return m.group(0)


@pytest.fixture(scope="module")
def servers():
  """Every server of the module, started at once (each imports JAX: seconds)."""
  specs = {
      "jpeg": ("--reward", "jpeg_compressibility"),
      "shapes": ("--reward", "shapes_fidelity", "--workers", "2"),
      "hang": ("--reward", "jpeg_compressibility", "--sleep", "30"),
      "malformed": ("--reward", "jpeg_compressibility", "--fault", "malformed_json"),
      "wrong_count": ("--reward", "jpeg_compressibility", "--fault", "wrong_count"),
      "nonfinite": ("--reward", "jpeg_compressibility", "--fault", "nonfinite"),
      "http_500": ("--reward", "jpeg_compressibility", "--fault", "http_500"),
      "dies": ("--reward", "jpeg_compressibility"),
      "slow_a": ("--reward", "jpeg_compressibility", "--sleep", "1.0"),
      "slow_b": ("--reward", "jpeg_compressibility", "--sleep", "1.0"),
  }
  procs = {k: start_server(*v) for k, v in specs.items()}
  try:
    yield {k: (p, url_of(p)) for k, p in procs.items()}
  finally:
    for p in procs.values():
      with contextlib.suppress(ProcessLookupError):
        p.kill()
      p.wait()


def frames_u8(b=6, t=3, size=16, seed=0):
  """Frames exactly representable in uint8 (k / 255), as a model's decoded video would be
  after the wire's quantisation."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (b, t, size, size, 3)).astype(np.float32) / 255.0


def client(url, name="remote", **over):
  s = dict(url=url, timeout_s=10.0, retries=0, backoff_s=0.05)
  s.update(over)
  return registry.build(name, registry.settings("remote", **s))


PROMPTS = [f"a {c} circle moving left" for c in ("red", "green", "blue", "yellow", "red",
                                                  "blue")]


def test_round_trip_equals_local_scoring(servers):
  x = frames_u8()
  local = registry.score("jpeg_compressibility", x, PROMPTS)
  for batch_size, in_flight in ((0, 1), (4, 2), (1, 3)):  # one request; 2 chunks; 6 chunks
    fn = client(servers["jpeg"][1], batch_size=batch_size, max_in_flight=in_flight)
    got = registry.score(fn, x, PROMPTS)
    np.testing.assert_array_equal(got, local)
    assert fn.fn.requests == (1 if batch_size == 0 else -(-6 // batch_size))
  # Continuous frames: the wire sends round(255 x), which is what the reward then sees.
  xc = np.random.default_rng(1).random((6, 3, 16, 16, 3), np.float32)
  np.testing.assert_array_equal(registry.score(client(servers["jpeg"][1]), xc, PROMPTS),
                                registry.score("jpeg_compressibility", xc, PROMPTS))


def test_round_trip_of_a_jax_reward_to_float32_precision(servers):
  from euphonium_jax.data import world
  import jax
  attrs = world.sample_attrs(jax.random.key(0), 4, "train")
  clips = np.asarray(world.render(world.clip_params(jax.random.key(1), attrs)))
  x = np.round(clips * 255.0) / 255.0
  prompts = world.captions(np.asarray(attrs))
  local = registry.score("shapes_fidelity", x.astype(np.float32), prompts)
  got = registry.score(client(servers["shapes"][1], batch_size=2), x, prompts)
  np.testing.assert_allclose(got, local, rtol=1e-5, atol=1e-6)
  assert local.mean() > 0.5  # real clips of their prompts: the comparison is not of zeros


def test_frame_selection_sends_the_chosen_frames():
  assert remote.frame_indices(9, "all", 4) == list(range(9))
  assert remote.frame_indices(9, "first", 4) == [0]
  assert remote.frame_indices(9, "last", 4) == [8]
  assert remote.frame_indices(9, "every", 4) == [0, 4, 8]
  x = frames_u8(b=2, t=5)
  body = remote.encode_request("r", remote.to_uint8(x[:, [0, 2, 4]]), ["a", "b"], [{}, {"k": 1}],
                               [0, 2, 4], 5)
  header, back = remote.decode_request(body)
  assert header["shape"] == [2, 3, 16, 16, 3] and header["frame_indices"] == [0, 2, 4]
  assert header["metadata"] == [{}, {"k": 1}] and header["num_frames"] == 5
  np.testing.assert_array_equal(back, np.round(x[:, [0, 2, 4]] * 255).astype(np.uint8))
  with pytest.raises(ValueError, match="frame bytes for shape"):
    remote.decode_request(body[:-1])


def test_every_frame_mode_scores_what_local_scoring_of_those_frames_gives(servers):
  x = frames_u8(t=5)
  fn = client(servers["jpeg"][1], frames="every", every=2)
  np.testing.assert_array_equal(registry.score(fn, x, PROMPTS),
                                registry.score("jpeg_compressibility", x[:, [0, 2, 4]], PROMPTS))


@pytest.mark.parametrize("server, message", [
    ("malformed", r"malformed JSON in the answer"),
    ("wrong_count", r"answered 5 scores for 6 videos"),
    ("nonfinite", r"answered a non-finite or non-numeric score nan for video 0"),
    ("http_500", r"HTTP 500 Internal Server Error: .*injected fault"),
])
def test_wrong_answers_are_named(servers, server, message):
  url = servers[server][1]
  fn = client(url, name="remote_judge", retries=1)
  with pytest.raises(registry.RewardError) as e:
    registry.score(fn, frames_u8(), PROMPTS)
  text = str(e.value)
  assert re.search(message, text), text
  assert f"remote reward 'remote_judge' at {url}/score" in text
  assert "the outcome reward 'remote_judge' raised RemoteRewardError" in text
  if server == "http_500":
    assert "(videos 0..5 of 6; 2 attempts)" in text  # 5xx is retried


def test_a_server_that_hangs_past_the_timeout_is_named(servers):
  url = servers["hang"][1]
  fn = client(url, timeout_s=0.5, retries=1, backoff_s=0.1, health_check=True)
  t0 = time.time()
  with pytest.raises(registry.RewardError, match=re.escape(
      f"at {url}/score: no answer within timeout_s = 0.5 s")) as e:
    registry.score(fn, frames_u8(), PROMPTS)
  assert "2 attempts" in str(e.value)
  assert 1.0 <= time.time() - t0 < 5.0  # two timeouts and a backoff, not the 30 s sleep


def test_a_server_that_dies_mid_run_is_named(servers):
  proc, url = servers["dies"]
  fn = client(url, retries=2, backoff_s=0.05)
  x = frames_u8()
  first = registry.score(fn, x, PROMPTS)
  np.testing.assert_array_equal(first, registry.score("jpeg_compressibility", x, PROMPTS))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  with pytest.raises(registry.RewardError) as e:
    registry.score(fn, x, PROMPTS)
  text = str(e.value)
  assert f"at {url}/score: " in text and "Connection refused" in text, text
  assert "3 attempts" in text


def test_an_unreachable_server_fails_when_the_reward_is_built():
  with pytest.raises(remote.RemoteRewardError, match=r"at http://127.0.0.1:9/health: .*refused"):
    client("http://127.0.0.1:9")


def test_several_remote_rewards_are_scored_concurrently(servers):
  built = {"remote_a": client(servers["slow_a"][1], name="remote_a"),
           "remote_b": client(servers["slow_b"][1], name="remote_b"),
           "jpeg_compressibility": registry.build("jpeg_compressibility")}
  x = frames_u8()
  t0 = time.time()
  out = registry.score_many(built, x, PROMPTS)
  concurrent = time.time() - t0
  t0 = time.time()
  serial = registry.score_many(built, x, PROMPTS, concurrent=False)
  sequential = time.time() - t0
  for name in built:
    np.testing.assert_array_equal(out[name], serial[name])
    np.testing.assert_array_equal(out[name], out["jpeg_compressibility"])
  assert sequential >= 2.0 and concurrent < 1.8, (concurrent, sequential)


# ------------------------------------------------------------------ grpo end to end


@pytest.mark.slow
def test_grpo_stops_naming_the_dead_server_at_the_last_checkpoint(tiny_init, tmp_path):
  """The server answers two requests (the start evaluation, iteration 1) and exits: the run
  stops at iteration 2 with the named error, and checkpoint 1 restores and verifies."""
  from euphonium_jax import checkpoint, main, report
  from euphonium_jax import config as config_lib
  proc = start_server("--reward", "jpeg_compressibility", "--max-requests", "2")
  try:
    url = url_of(proc)
    c = use_tiny_world(config_lib.get_default_config())  # the tiny world's random nets
    c.stages = ("grpo",)
    c.init.pretrain = os.path.join(tiny_init, "pretrain")
    c = config_lib.as_baseline(c, "dance_grpo")
    c.eval.update(num_prompts=8, num_steps=4, num_videos=4)
    c.sampling.update(num_steps=4, group_size=4)
    c.grpo.update(iterations=3, prompts_per_iteration=2, samples_per_update=8, lr=1e-4,
                  eval_every=0, ckpt_every=1, rewards=(("remote", 1.0),))
    c.rewards.remote.update(url=url, retries=1, backoff_s=0.05, timeout_s=10.0)
    workdir = str(tmp_path / "w")
    with pytest.raises(registry.RewardError) as e:
      main.run(c, workdir)
  finally:
    proc.kill()
    proc.wait()
  text = str(e.value)
  assert f"the outcome reward 'remote' raised RemoteRewardError: remote reward 'remote' at " \
         f"{url}/score: " in text, text
  assert "stopped at iteration 2: the last verified checkpoint is iteration 1" in text, text
  mgr = checkpoint.manager(os.path.join(workdir, "grpo", "checkpoints"))
  assert checkpoint.last_intact_step(mgr) == 1 and mgr.latest_step() == 1
  step, state = checkpoint.restore_latest(mgr, None)
  assert step == 1 and int(np.asarray(state["step"])) == 1
  rows = report.read_metrics(workdir, "grpo")
  assert [r["step"] for r in rows] == [0, 1]
  assert np.isfinite(rows[1]["reward/remote"]) and rows[1]["reward/remote"] < 0  # -JPEG kB
  assert not checkpoint.is_done(os.path.join(workdir, "grpo", "final"))
