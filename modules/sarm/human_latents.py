"""The human-latent buffer: SARM latents of human demonstrations, the reference of the KL term.

Built once from a demonstrations JSONL (``{"prompt", "response"}`` per line) by
``python cli.py sarm-human-latents`` and saved as a ``.pt`` file that a config points to:

    {"latents": [N, n] float16/float32, "latent_ids": [n] long (which latents the columns are),
     "sarm": source, "latent_size": L, "pooling": ..., "topk": bool, "count": N}

Storing a subset of the latent dimensions (``latent_ids``) keeps the file small: 3,000 demonstrations
of all 65,536 latents are 400 MB in fp16, of 512 chosen latents 3 MB. The file loads with
``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from datamodules.preference_pairs import read_demonstrations
from modules.errors import UserError
from modules.sarm.model import SARMRewardModel
from modules.sarm.shaping import check_feature_ids


@dataclass
class HumanLatents:
    latents: torch.Tensor
    """[N, n] latents of the demonstrations at the pooled token, columns = ``latent_ids``."""
    latent_ids: list[int]
    source: str
    latent_size: int

    def columns(self, ids: Sequence[int]) -> torch.Tensor:
        """[N, len(ids)] the columns of the given latent ids (each must be stored)."""
        position = {latent: i for i, latent in enumerate(self.latent_ids)}
        missing = [i for i in ids if i not in position]
        if missing:
            raise UserError(f"the human-latent buffer holds no column for latents {missing[:5]}: rebuild it "
                            "with those ids in --latent_ids (or with all latents)")
        return self.latents[:, [position[i] for i in ids]].float()


def build_human_latents(rm: SARMRewardModel, demos_path: str, latent_ids: Sequence[int] | None = None,
                        batch_size: int = 8, source: str = "", dtype: torch.dtype = torch.float16,
                        progress: bool = True) -> dict:
    """Score the demonstrations with ``rm`` and keep the chosen latent columns (all when None)."""
    demos = read_demonstrations(demos_path)
    ids = list(range(rm.latent_size)) if latent_ids is None else [int(i) for i in latent_ids]
    check_feature_ids(ids, rm.latent_size, "latent_ids")
    columns = []
    for begin in range(0, len(demos), batch_size):
        chunk = demos[begin:begin + batch_size]
        out = rm.score([d.prompt for d in chunk], [d.response for d in chunk], batch_size=batch_size)
        columns.append(out.latents[:, ids].to(dtype))
        if progress:
            print(f"  [human latents] {min(begin + batch_size, len(demos))}/{len(demos)}", flush=True)
    return {"latents": torch.cat(columns), "latent_ids": torch.tensor(ids, dtype=torch.long), "sarm": source,
            "latent_size": rm.latent_size, "pooling": rm.pooling, "topk": rm.use_topk, "count": len(demos)}


def save_human_latents(payload: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_human_latents(path: str | Path) -> HumanLatents:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"human-latent buffer '{path}' does not exist: build it with "
                        "'python cli.py sarm-human-latents --demos DEMOS.jsonl --out FILE.pt'")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
        latents, ids = payload["latents"], payload["latent_ids"]
    except Exception as err:
        raise UserError(f"'{path}' is not a human-latent buffer ({str(err).splitlines()[0] if str(err) else err})") from None
    if latents.ndim != 2 or latents.shape[0] == 0 or latents.shape[1] != len(ids):
        raise UserError(f"human-latent buffer '{path}' is malformed: latents {list(latents.shape)}, {len(ids)} ids")
    return HumanLatents(latents, [int(i) for i in ids], str(payload.get("sarm", "")),
                        int(payload.get("latent_size", max(int(i) for i in ids) + 1)))
