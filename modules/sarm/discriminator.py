"""A density-ratio discriminator: KL(z_policy || z_human) from latents, trained online.

A classifier d(z) trained with logistic loss on balanced batches (human latents labelled 0, policy
latents 1) converges to d*(z) = log p_policy(z) / p_human(z). Hence

    KL(p_policy || p_human) = E_{z ~ policy}[ log p_policy(z) / p_human(z) ] ~ mean of d(z) over policy samples,

and d(z) of one sample is that sample's contribution. The network is an MLP dim -> hidden (tanh) -> 1
on a chosen subset of latent dimensions, each standardised with the human buffer's mean and spread.

Everything that a resumed run needs (weights, the input scaling, the Adam state, the sampling
generator, the step count) is in :meth:`state_dict` (the non-tensor parts through PyTorch's
``get_extra_state``), so the discriminator resumes exactly, also as a submodule of a larger module.

Departures from the seed (numbered):
1. Inputs are standardised per dimension with the human buffer's statistics (the seed feeds raw
   latents, whose scale differs by orders of magnitude between features).
2. Its own seeded generator draws the human rows of each balanced batch, so runs repeat exactly.
"""

from __future__ import annotations

import torch
from torch import nn


class DensityRatioDiscriminator(nn.Module):
    """MLP classifier human (0) vs policy (1) whose logit estimates log p_policy / p_human.

    Args:
        dim: Number of latent dimensions it reads.
        hidden: Width of the hidden layer.
        lr: Adam learning rate.
        batch_size: Samples per class in one balanced training batch.
        seed: Seed of the weights' initialisation and of the sampling generator.
    """

    def __init__(self, dim: int, hidden: int = 256, lr: float = 1e-3, batch_size: int = 64, seed: int = 0):
        super().__init__()
        self.dim, self.hidden, self.lr, self.batch_size = dim, hidden, lr, batch_size
        init = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        with torch.no_grad():
            for layer in (self.net[0], self.net[2]):
                bound = layer.weight.shape[1] ** -0.5
                layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=init))
                layer.bias.zero_()
        self.register_buffer("in_mean", torch.zeros(dim))
        self.register_buffer("in_scale", torch.ones(dim))
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.steps = 0

    # ----------------------------------------------------------------- state
    def get_extra_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "steps": self.steps}

    def set_extra_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"].cpu() if hasattr(state["generator"], "cpu") else state["generator"])
        self.steps = int(state["steps"])

    # ----------------------------------------------------------------- use
    @torch.no_grad()
    def fit_scaler(self, human: torch.Tensor) -> None:
        """Standardise inputs with the human latents' per-dimension mean and spread."""
        human = human.float().to(self.in_mean.device)
        std = human.std(0) if human.shape[0] > 1 else torch.ones(self.dim, device=human.device)
        floor = max(float(std.mean()) * 0.1, 1e-3)
        self.in_mean.copy_(human.mean(0))
        self.in_scale.copy_(std.clamp(min=floor))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """[N] estimated log p_policy(z) / p_human(z) for latents [N, dim]."""
        z = z.to(self.in_mean.device).float()
        return self.net((z - self.in_mean) / self.in_scale).squeeze(-1)

    @torch.no_grad()
    def estimate_kl(self, policy: torch.Tensor) -> float:
        """Mean logit over policy samples: the KL(policy || human) estimate."""
        return float(self.logits(policy).mean())

    def _rows(self, count: int, wanted: int) -> torch.Tensor:
        if wanted <= count:
            return torch.randperm(count, generator=self.generator)[:wanted]
        return torch.randint(count, (wanted,), generator=self.generator)

    def train_step(self, human: torch.Tensor, policy: torch.Tensor) -> dict[str, float]:
        """One Adam step on a balanced batch: up to ``batch_size`` rows of each, drawn by the generator."""
        n = min(self.batch_size, max(policy.shape[0], 1))
        h = human[self._rows(human.shape[0], n)]
        p = policy[self._rows(policy.shape[0], n)]
        device = self.in_mean.device
        x = torch.cat([h.to(device), p.to(device)])
        y = torch.cat([torch.zeros(n), torch.ones(n)]).to(device)
        with torch.enable_grad():
            logits = self.logits(x)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.steps += 1
        accuracy = float(((logits.detach() > 0).float() == y).float().mean())
        return {"loss": float(loss.detach()), "accuracy": accuracy}

    def update(self, human: torch.Tensor, policy: torch.Tensor, steps: int = 1) -> dict[str, float]:
        """``steps`` training steps; returns their mean loss and accuracy."""
        totals = {"loss": 0.0, "accuracy": 0.0}
        for _ in range(steps):
            for key, value in self.train_step(human, policy).items():
                totals[key] += value / steps
        return totals
