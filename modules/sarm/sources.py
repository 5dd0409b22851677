"""Where a SARM comes from: every kind of source the loader takes, resolved to a local folder.

- a folder in the released layout (:mod:`modules.sarm.checkpoint`);
- ``embedded:<name>``: an embedded SARM (:mod:`modules.sarm.embedded`), built once and cached;
- a Hub id (``Schrieffer/Llama-SARM-4B``), downloaded with ``huggingface_hub``.

This module sits above both :mod:`~modules.sarm.checkpoint` (which only reads and writes the folder
format) and :mod:`~modules.sarm.embedded`; :class:`~modules.sarm.model.SARMRewardModel` loads through it.
"""

from __future__ import annotations

import os
from pathlib import Path

from modules.errors import UserError


def resolve_sarm_source(source: str) -> Path:
    """A local SARM folder for ``source``: a folder, ``embedded:<name>`` (built once, cached), or a Hub id."""
    if source.startswith("embedded:"):
        from modules.sarm.embedded import cached_sarm_folder

        return cached_sarm_folder(source.split(":", 1)[1])
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"SARM '{source}' is a file: point at a SARM folder (config.json + safetensors)")
        return path
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise UserError(f"SARM folder '{source}' does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer*",
                                                          "special_tokens_map.json"])
    except Exception as err:  # offline, gated, unknown id: all one message
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise UserError(f"could not fetch SARM '{source}' from the Hub{offline}: {first}. "
                        "Pass a local SARM folder, 'embedded:sarm-smollm2', or a reachable Hub id") from None
    return Path(local)
