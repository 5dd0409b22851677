"""SARM: a sparse-autoencoder reward model, its latents, and control of them in RL (arXiv 2508.08746).

- :mod:`~modules.sarm.checkpoint` — the released checkpoint layout: read, check, write.
- :mod:`~modules.sarm.sae` — the TopK SAE and its input standardisation (and a small trainer).
- :mod:`~modules.sarm.network` — :class:`SARMNetwork`: reward and pooled latents z, in-RM control (from a folder).
- :mod:`~modules.sarm.sources` — SARM sources (folder, ``embedded:<name>``, Hub id) resolved to a folder.
- :mod:`~modules.sarm.model` — :class:`SARMRewardModel`: the network, loaded from any source.
- :mod:`~modules.sarm.shaping` — the shaping terms as pure functions.
- :mod:`~modules.sarm.discriminator` — the density-ratio discriminator behind the KL term.
- :mod:`~modules.sarm.human_latents` — the human-latent buffer.
- :mod:`~modules.sarm.reward` — :class:`SARMReward`, the loop's reward function.
- :mod:`~modules.sarm.embedded` — the embedded SARM built on SmolLM2 (``embedded:sarm-smollm2``).
- :mod:`~modules.sarm.probes` — phase 2: candidate features, clamping probes, best-of-N.
- :mod:`~modules.sarm.tools` — the command functions (``sarm-build``, ``sarm-probe``, ...).
"""
