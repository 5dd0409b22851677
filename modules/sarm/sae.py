"""The TopK sparse autoencoder inside a SARM, and the standardisation of its input.

A SARM reads the residual stream ``h`` after its last decoder layer, standardises each token over
the hidden dimension, and encodes it:

    x        = (h - mean(h)) / (std(h) + 1e-6)        # per token; std with Bessel's correction
    pre_acts = W_enc (x - pre_bias) + latent_bias     # the dense encoding, [.., latent]
    latents  = TopK(pre_acts)                         # the k largest kept in place, the rest 0
    x_hat    = W_dec latents + pre_bias               # the reconstruction (used when training)

Parameter names (``pre_bias``, ``latent_bias``, ``encoder.weight``, ``decoder.weight``) are those of
the released checkpoints, so a state dict loads under the ``sae.`` prefix unchanged.

Departures from the authors' code (github.com/schrieffer-z/sarm, ``src/sae.py``):
1. :func:`train_topk_sae` is ours: the authors train their SAE elsewhere at scale; this trainer
   (decoder columns kept at unit norm, pre-bias started at the data mean, encoder started as the
   decoder's transpose) serves the miniature embedded SARM only.
2. :meth:`TopKSAE.pre_acts` and :meth:`TopKSAE.topk` take any leading shape, so the reward model can
   encode only the pooled positions instead of every token (same numbers, less memory).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

STANDARDISE_EPS = 1e-6


def standardise(hidden: torch.Tensor, eps: float = STANDARDISE_EPS) -> torch.Tensor:
    """Per-token standardisation over the last dimension, as the released SARM does it."""
    mean = hidden.mean(dim=-1, keepdim=True)
    std = hidden.std(dim=-1, keepdim=True)
    return (hidden - mean) / (std + eps)


class TopKSAE(nn.Module):
    """TopK sparse autoencoder with the released SARM's parameter names.

    Args:
        hidden_size: Width of the residual stream it reads.
        latent_size: Number of latents.
        k: Latents kept per token by :meth:`topk`.
    """

    def __init__(self, hidden_size: int, latent_size: int, k: int):
        super().__init__()
        if not 0 < k <= latent_size:
            raise ValueError(f"k must be in 1..{latent_size}, got {k}")
        self.hidden_size, self.latent_size, self.k = hidden_size, latent_size, k
        self.pre_bias = nn.Parameter(torch.zeros(hidden_size))
        self.latent_bias = nn.Parameter(torch.zeros(latent_size))
        self.encoder = nn.Linear(hidden_size, latent_size, bias=False)
        self.decoder = nn.Linear(latent_size, hidden_size, bias=False)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Dense encoding of standardised inputs ``x`` [..., hidden] -> [..., latent]."""
        return self.encoder(x - self.pre_bias) + self.latent_bias

    def topk(self, pre_acts: torch.Tensor) -> torch.Tensor:
        """Keep the k largest pre-activations of each row in place, zero elsewhere."""
        top = torch.topk(pre_acts, self.k, dim=-1)
        return torch.zeros_like(pre_acts).scatter_(-1, top.indices, top.values)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.topk(self.pre_acts(x))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents) + self.pre_bias

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.encode(x)
        return latents, self.decode(latents)


@dataclass
class SAETrainingReport:
    """How well a trained SAE reconstructs held-out tokens, and how many latents never fire."""

    fraction_variance_explained: float
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over held-out tokens."""
    dead_latents: int
    """Latents that fired on none of the tokens seen in the last epoch nor the held-out ones."""
    latent_size: int
    steps: int
    seconds: float

    @property
    def dead_fraction(self) -> float:
        return self.dead_latents / self.latent_size


@torch.no_grad()
def fraction_variance_explained(sae: TopKSAE, x: torch.Tensor, batch: int = 4096) -> tuple[float, torch.Tensor]:
    """FVE of ``sae`` on standardised tokens ``x`` [N, d], and a [latent] bool of latents that fired."""
    residual, total = 0.0, 0.0
    fired = torch.zeros(sae.latent_size, dtype=torch.bool)
    mean = x.mean(0)
    for start in range(0, x.shape[0], batch):
        chunk = x[start:start + batch]
        latents, x_hat = sae(chunk)
        residual += float(((chunk - x_hat) ** 2).sum())
        total += float(((chunk - mean) ** 2).sum())
        fired |= (latents > 0).any(0)
    return 1.0 - residual / max(total, 1e-12), fired


def train_topk_sae(train: torch.Tensor, heldout: torch.Tensor, latent_size: int, k: int, *, steps: int = 1500,
                   batch_size: int = 512, lr: float = 1e-3, seed: int = 0,
                   log_every: int = 0) -> tuple[TopKSAE, SAETrainingReport]:
    """Train a TopK SAE on standardised tokens ``train`` [N, d]; report FVE on ``heldout`` [M, d].

    Loss: mean squared reconstruction error (normalised by the inputs' variance). The decoder's
    columns are renormalised to unit length after every step, which keeps the scale of latents
    meaningful (a latent's value is the length of its contribution to the reconstruction).
    """
    start_time = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    held = heldout
    hidden = train.shape[1]

    torch.manual_seed(seed)
    sae = TopKSAE(hidden, latent_size, k)
    with torch.no_grad():
        direction = torch.randn(hidden, latent_size, generator=g)
        direction /= direction.norm(dim=0, keepdim=True)
        sae.decoder.weight.copy_(direction)
        sae.encoder.weight.copy_(direction.T)
        sae.pre_bias.copy_(train.mean(0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    variance = float(((train - train.mean(0)) ** 2).sum(-1).mean())
    fired = torch.zeros(latent_size, dtype=torch.bool)
    steps_per_epoch = max(1, train.shape[0] // batch_size)
    for step in range(steps):
        if step % steps_per_epoch == 0:
            perm = torch.randperm(train.shape[0], generator=g)
            if step + steps_per_epoch >= steps:
                fired.zero_()  # count firing over the last (partial) epoch only
        idx = perm[(step % steps_per_epoch) * batch_size:(step % steps_per_epoch + 1) * batch_size]
        batch = train[idx]
        latents, x_hat = sae(batch)
        loss = ((x_hat - batch) ** 2).sum(-1).mean() / variance
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            sae.decoder.weight /= sae.decoder.weight.norm(dim=0, keepdim=True).clamp(min=1e-8)
            fired |= (latents > 0).any(0)
        if log_every and (step + 1) % log_every == 0:
            print(f"  [sae] step {step + 1}/{steps}  normalised MSE {float(loss.detach()):.4f}", flush=True)
    fve, fired_held = fraction_variance_explained(sae, held)
    dead = int((~(fired | fired_held)).sum())
    report = SAETrainingReport(fve, dead, latent_size, steps, time.perf_counter() - start_time)
    return sae.requires_grad_(False), report
