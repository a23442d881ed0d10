"""The grpo stage's iteration without host round trips (issue 15 item 2): advantages,
transition selection, the update orders and the reward metrics in one jitted program
(`policy.make_prepare_program`) equal the host computation the stage did before, on an
8-device mesh; the non-finite counter lives in the update step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from euphonium_jax import bundles, config as config_lib, embedded, parallel
from euphonium_jax import policy as policy_lib
from euphonium_jax.rl import grpo

from test_grpo_parallel import TINY


def tiny_policy(mesh, **grpo_updates):
  cfg = config_lib.from_file(TINY)
  cfg.grpo.update(prompts_per_iteration=4, samples_per_update=8, inner_epochs=2,
                  rewards=(("shapes_fidelity", 1.0), ("jpeg_compressibility", 0.5)),
                  **grpo_updates)
  nets = bundles.get(cfg)
  model_g = embedded.split_params(embedded.build("model", cfg, seed=0))[0]
  vae_g = embedded.split_params(embedded.build("vae", cfg, seed=1))[0]
  prm_g = embedded.split_params(embedded.build("prm", cfg, seed=2))[0]
  return policy_lib.make_policy(cfg, nets, mesh, model_g, vae_g, prm_g)


def host_reference(pol, r, pr, k_steps, k_perm):
  """What the stage computed on the host before: numpy in, numpy out, one call at a time."""
  gc = pol.config.grpo
  group, batch, n = pol.sampler.group_size, pol.batch, pol.sampler.num_steps
  adv_o = np.asarray(grpo.outcome_advantages(jnp.asarray(r), group, gc.adv_clip,
                                             adv_std=gc.adv_std, adv_eps=gc.adv_eps)).T
  adv_p = (np.zeros_like(pr) if gc.advantage_mode == "none" else np.asarray(
      grpo.process_advantages(jnp.asarray(pr), group, gc.adv_clip, gc.process_source,
                              adv_std=gc.adv_std, adv_eps=gc.adv_eps)))
  steps = np.asarray(grpo.select_steps(k_steps, batch, n, gc.timestep_fraction,
                                       selection=gc.step_selection))
  per = gc.samples_per_update
  orders = [np.asarray(jax.random.permutation(jax.random.fold_in(k_perm, e), batch))[
      u * per:(u + 1) * per] for e in range(gc.inner_epochs) for u in range(batch // per)]
  metrics = {}
  for i, name in enumerate(pol.reward_names):
    v = r[i].reshape(-1, group)
    metrics[f"reward/{name}"] = r[i].mean()
    metrics[f"reward/{name}_group_std"] = v.std(axis=1, ddof=1).mean()  # group_report: sample std
    metrics[f"reward/{name}_zero_std_fraction"] = np.mean(v.max(1) == v.min(1))
  metrics["process_reward"] = pr[:, pol.arrs.scored].mean()
  return adv_o, adv_p, steps, np.stack(orders), metrics


@pytest.mark.parametrize("mode", ["both", "none"])
def test_prepare_program_equals_the_host_computation(mode):
  mesh = parallel.make_mesh((4, 2), ("data", "fsdp"))
  pol = tiny_policy(mesh, advantage_mode=mode)
  batch, n = pol.batch, pol.sampler.num_steps
  assert batch == 16 and pol.arrs.scored.any()
  rng = np.random.default_rng(0)
  r = rng.normal(size=(2, batch)).astype(np.float32)
  r[1, :4] = 0.25  # one group without outcome signal
  pr = rng.normal(size=(batch, n)).astype(np.float32)
  k_steps, k_perm = jax.random.split(jax.random.key(3))
  prep = policy_lib.make_prepare_program(pol)(
      parallel.global_array(r, parallel.replicated(mesh)),
      parallel.global_array(pr, parallel.batch_sharding(mesh, 2)), None, k_steps, k_perm)
  adv_o, adv_p, steps, orders, metrics = host_reference(pol, r, pr, k_steps, k_perm)
  np.testing.assert_allclose(np.asarray(prep["adv_outcome"]), adv_o, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(prep["adv_process"]), adv_p, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(prep["steps"]), steps)
  np.testing.assert_array_equal(np.asarray(prep["orders"]), orders)
  assert orders.shape == (4, 8) and sorted(orders[:2].ravel()) == list(range(batch))
  got = jax.device_get(prep["metrics"])
  assert set(got) == set(metrics)
  for k in metrics:
    np.testing.assert_allclose(got[k], metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert got["reward/jpeg_compressibility_zero_std_fraction"] == 0.25
  assert prep["adv_outcome"].sharding.is_equivalent_to(parallel.batch_sharding(mesh, 2), 2)


def test_update_step_counts_nonfinite_updates_in_a_row():
  """The counter is updated inside the jitted update (no host round trip per step): +1 per
  skipped step, reset by a kept one, held once it has reached grpo.max_nonfinite."""
  mesh = parallel.make_mesh((1, 1), ("data", "fsdp"), jax.devices()[:1])
  cfg_updates = dict(max_nonfinite=2)
  pol = tiny_policy(mesh, **cfg_updates)
  cfg = pol.config
  tx = policy_lib.make_tx(cfg)
  model = embedded.split_params(embedded.build("model", cfg, seed=0))
  vae = embedded.split_params(embedded.build("vae", cfg, seed=1))
  prm = embedded.split_params(embedded.build("prm", cfg, seed=2))
  frozen, frozen_sh = policy_lib.frozen_inputs(vae, model[2], prm, mesh)
  p_sh = jax.tree.map(lambda _: parallel.replicated(mesh), model[1])
  state, state_sh = policy_lib.init_state(pol, tx, model[1], p_sh)
  text_g, text_p, text_r = embedded.split_params(embedded.build("text", cfg, seed=3))
  table = embedded.prompt_table(cfg)
  enc = {"text": jax.jit(embedded.text_fn(text_g))((text_p, text_r), table.ids[:4],
                                                    table.mask[:4])}
  pidx = jnp.repeat(jnp.arange(4, dtype=jnp.int32), pol.sampler.group_size)
  outs = policy_lib.make_rollout_program(pol, p_sh, frozen_sh)(
      state["params"], frozen, enc, pidx, jax.random.key(0))
  rng = np.random.default_rng(1)
  prep = policy_lib.make_prepare_program(pol)(
      jnp.asarray(rng.normal(size=(2, pol.batch)), jnp.float32), outs["process_rewards"],
      None, jax.random.key(1), jax.random.key(2))
  data = policy_lib.update_data(pol, outs, prep, pidx)
  nan_data = dict(data, adv_outcome=jnp.full_like(data["adv_outcome"], jnp.nan))
  step = policy_lib.make_update_step(pol, tx, state_sh, frozen_sh)
  seen = []
  for d in (nan_data, data, nan_data, nan_data, data, nan_data):
    before = jax.tree.map(np.asarray, state["params"])
    state, met = step(state, d, prep["orders"][0], frozen, enc)
    seen.append((int(met["skipped"]), int(state["nonfinite"])))
    if met["skipped"]:
      for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, np.asarray(b))
  assert seen == [(1, 1), (0, 0), (1, 1), (1, 2), (0, 2), (1, 3)]
  hlo = step.lower(state, data, prep["orders"][0], frozen, enc).as_text()
  assert "callback" not in hlo.lower()
