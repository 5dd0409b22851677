"""SARMFeaturePPO: PPO on a LoRA policy rewarded by a sparse-autoencoder reward model (SARM, arXiv
2508.08746), with its features controlled inside the loop.

This is :class:`modules.ppo.PPO` with a SARM reward (:class:`modules.sarm.reward.SARMReward`):

    R_total = R_SARM(x, y) - sum_i alpha_i * 1[z_i > tau_i] - beta * KL_hat(z_policy || z_human)

where z is the SARM's pooled SAE latent vector of (prompt, reply); R_SARM may itself be computed
with chosen latents clamped or capped before the score head (in-RM control), and KL_hat comes from
a density-ratio discriminator trained online on the policy's latents against a buffer of human
latents. The per-sample latents travel to callbacks (``callbacks.feature_logging``) in
``Rewards.features["latents"]``; the discriminator's state is checkpointed with the method's
(``reward_state``), so a resumed run continues it exactly. A judge can be added to the reward with
:class:`modules.rewards.WeightedSum` (SARM + judge by configured weights).

Design choices:

1. One GPU, one model: the policy is a LoRA adapter on a frozen base (optionally 4-bit), its value
   head shares the policy's trunk, and the reference is the adapter switched off (PPO's
   departures 1-4): no separate reference or value model.
2. The feature penalty reads the *uncontrolled* latents, so clamping a latent inside the RM never
   hides it from the penalty; the KL term is per sample by default and the discriminator scores a
   batch before it trains on it (see :mod:`modules.sarm.reward`).
3. Held-out evaluation never trains the discriminator (``RewardFunction.evaluation``).
"""

from __future__ import annotations

from modules.ppo import PPO
from modules.rewards import RewardFunction


class SARMFeaturePPO(PPO):
    """PPO rewarded by a SARM with feature penalties, in-RM control and a KL term to human latents.

    Args:
        reward: The reward: a :class:`~modules.sarm.reward.SARMReward` (default: the embedded SARM
            built on SmolLM2, no controls), or a :class:`~modules.rewards.WeightedSum` of one and a judge.
        All other options are :class:`~modules.ppo.PPO`'s.
    """

    arm_names = ("adapter off", "adapter on")
    curve_metrics = ("reward/mean", "reward/sarm", "reward/feature_penalty", "reward/kl_penalty",
                     "kl/sampled_log_ratio_token", "response/length", "explained_variance", "sarm/kl_estimate")

    def __init__(self, reward: RewardFunction | None = None, **ppo_options) -> None:
        if reward is None:
            from modules.sarm.reward import SARMReward

            reward = SARMReward()
        super().__init__(reward=reward, **ppo_options)
