r"""Euphonium with the reference implementation's hyperparameters (DESIGN.md sections 3-4).

  python -m euphonium_jax.main --config configs/euphonium_reference.py --workdir /tmp/ref

Sampler: 16 steps, shift 5, constant eta 0.25, groups of 8 sharing one initial noise,
guidance 0.01 * dt * grad R (the `beta` parameterisation: eta^2 / (2 beta) with beta 3.125)
on steps 12-15, gradient not normalised, log-probs under the unguided mean; the outcome
reward scores the last step's clean estimate x0_hat. Outcome terms as the reference sums
them: the pixel reward with weight 2 (its VLM score counted under two names) and the PRM's
score of the final clean latent with weight 1; the process advantage with coefficient 1.
Ratio clip 1e-4, advantage clip 5, 60% of the 15 trainable transitions per sample, no KL.
AdamW lr 1e-6, betas 0.9/0.999, weight decay 1e-4, grad clip 1.0, constant rate.
Accumulation as the reference counts it: in samples. One accumulation step here is one
micro-batch of samples with all its trained transitions; the reference's 4 accumulation
steps of 1 sample per device make one optimiser step of 4 samples per device, i.e. 2 steps
per rollout of 8: `samples_per_update` = 4 x (data-parallel devices) with `accumulation` 4.
Evaluation: Euler ODE, 30 steps, shift 7. (On the embedded world this learning rate barely
moves the small network: configs/euphonium.py is the tuned one.)
"""

from euphonium_jax import config as config_lib


def get_config():
  config = config_lib.get_default_config()
  config.stages = ("grpo",)
  config.init.pretrain = "assets/embedded"
  config.init.prm = "assets/embedded/prm"
  config.sampling.preset = "euphonium"  # N 16, shift 5, eta 0.25, shared noise, beta 3.125 from 12
  config.grpo.update(
      iterations=100, prompts_per_iteration=1, samples_per_update=4, accumulation=4,
      rewards=(("shapes_fidelity", 2.0), ("prm_final", 1.0)),
      advantage_mode="both", outcome_coef=1.0, process_coef=1.0, process_source="pre",
      adv_clip=5.0, clip_range=1e-4, kl_coef=0.0, distill_coef=0.0, timestep_fraction=0.6,
      score="x0_hat", lr=1e-6, b1=0.9, b2=0.999, weight_decay=1e-4, grad_clip=1.0,
      warmup_steps=0, eval_every=10)
  config.eval.update(num_steps=30, shift=7.0)
  return config
