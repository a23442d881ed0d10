r"""Euphonium on the embedded world: PRM-gradient-guided SDE rollouts, dual-reward GRPO.

  python -m euphonium_jax.main --config configs/euphonium.py --workdir /tmp/euph_grpo

Starts from the shipped base model and PRM (assets/embedded, assets/embedded/prm). The
sampler is the reference's (16 steps, shift 5, constant eta 0.25, one initial noise per group
of 8, log-probs under the unguided mean) with guidance strengthened for this PRM: the
`theory` parameterisation, mean += g^2 dt grad R / beta, on steps 8-15 (the PRM's
quality-vs-t report is in assets/embedded_prm_report.json). The process advantage of a
transition is the change of the PRM score across it (`delta`): the reference's pre-step score
does not depend on the action taken, so in expectation it adds only variance to the policy
gradient. 16 prompts x 8 rollouts per iteration and one optimiser step on all 128: with 4
prompts (32 rollouts) the gradient was too noisy to move the held-out reward in 100
iterations (+-0.01), with 128 it gained +0.11 in 15. The learning rate and the one
optimiser step per iteration suit a small network trained from scratch (the reference's
1e-6 is for a 1.3B model). The sibling configs dance_grpo.py and flow_grpo.py change only
the sampler and the advantages, so the three compare like for like.
"""

from euphonium_jax import config as config_lib


def get_config():
  config = config_lib.get_default_config()
  config.stages = ("grpo",)
  config.init.pretrain = "assets/embedded"
  config.init.prm = "assets/embedded/prm"
  config.sampling.preset = "euphonium"
  config.sampling.guidance.mode = "theory"
  config.sampling.guidance.beta = 0.5
  config.sampling.guidance.start = 8
  config.grpo.update(
      iterations=60, prompts_per_iteration=16, samples_per_update=128,
      rewards=(("shapes_fidelity", 1.0),), advantage_mode="both",
      outcome_coef=1.0, process_coef=0.5, process_source="delta", lr=1e-4, weight_decay=1e-4,
      eval_every=10, ckpt_every=5)
  config.eval.num_prompts = 128
  return config
