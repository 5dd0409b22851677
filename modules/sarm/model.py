"""The SARM reward model from any source: scalar reward and SAE latents z for (prompt, response) pairs.

    rm = SARMRewardModel.load("Schrieffer/Llama-SARM-4B")      # or a folder, or "embedded:sarm-smollm2"
    out = rm.score(prompts, responses)                        # out.rewards [B], out.latents [B, 65536]
    with rm.controlled(LatentControl(clamp={48659: 0.0})):    # in-RM control before the score head
        clamped = rm.score(prompts, responses)

:class:`SARMRewardModel` is :class:`~modules.sarm.network.SARMNetwork` (the forward pass, pooling,
control and its departures from the authors' code: see :mod:`modules.sarm.network`) plus :meth:`load`,
which takes every source kind (:func:`~modules.sarm.sources.resolve_sarm_source`). Loading sits here,
above :mod:`modules.sarm.embedded`, because an ``embedded:<name>`` SARM is built on first use and its
builder runs a :class:`~modules.sarm.network.SARMNetwork` on the folder it is writing.
"""

from __future__ import annotations

import torch

from modules.sarm.network import (LatentControl, SARMBatch, SARMNetwork, SARMOutput, load_sarm_tokenizer,
                                  missing_tokenizer_message)
from modules.sarm.sources import resolve_sarm_source

__all__ = ["LatentControl", "SARMBatch", "SARMOutput", "SARMRewardModel", "load_sarm_tokenizer",
           "missing_tokenizer_message", "resolve_sarm_source"]


class SARMRewardModel(SARMNetwork):
    """A SARM: backbone (L decoder layers), TopK SAE and linear score head. Frozen; use :meth:`load`."""

    @classmethod
    def load(cls, source: str, dtype: str = "auto", device: str | torch.device | None = None,
             score_mode: str = "auto", pooling: str = "auto", k: int | None = None,
             max_length: int = 2048, tokenizer: str | None = None) -> "SARMRewardModel":
        """Load a SARM from a folder, ``embedded:<name>`` or a Hub id (bf16 on a GPU, fp32 on the CPU).

        ``score_mode``, ``pooling`` and ``k`` win over the folder's config (``auto``/None: the config's);
        ``tokenizer`` (Hub id, folder or ``embedded:<name>``) replaces the folder's own tokenizer.
        """
        return cls.from_folder(resolve_sarm_source(source), dtype=dtype, device=device, score_mode=score_mode,
                               pooling=pooling, k=k, max_length=max_length, tokenizer=tokenizer)
