"""The Hub, both ways (modules/models/hub.py): the model card, the upload up to huggingface_hub's
call boundary, and loading vectors and adapters by Hub id from a local cache laid out as the
library lays it out. Nothing here reaches the network: HF_HUB_OFFLINE is on (conftest) except where
a test replaces every HfApi method the push calls, or points HfApi at a server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData, constants

from modules.errors import UserError
from modules.evaluation import HeldOutReport
from modules.files import write_json_atomically
from modules.models.adapters import LoRAPolicy
from modules.models.hub import (HubSpec, find_artifact, hub_push_command, model_card, parse_hub_spec, push_to_hub,
                                resolve_adapter_folder)
from modules.models.loading import load_causal_lm
from modules.models.steering import SteeringVector
from modules.models.steering_io import load_steered_model, read_steering_vector, save_steering_vector

FAKE_TOKEN = "hf_FakeTokenForTests0123456789abcdef"
CONFIG = {
    "seed_everything": 7, "run_name": "hub_test", "output_dir": "steering_runs",
    "model": {"class_path": "modules.steering_rl.SteeringVectorRL", "init_args": {
        "model": "embedded:smollm2", "hook_layer": 1, "hook_point": "post_attn_norm", "reward_mode": "loglik",
        "judge": {"class_path": "modules.judges.openai_compat.OpenAICompatibleJudge", "init_args": {
            "base_url": "http://127.0.0.1:8000/v1", "model": "judge-org/judge-7b", "mode": "rating",
            "api_key_env": "OPENROUTER_API_KEY"}},
        "judge_persona": ["You flatter the user."], "counter_persona": ["You tell the user the truth."]}},
    "data": {"class_path": "datamodules.prompts.PromptDataModule",
             "init_args": {"train_file": "datamodules/data/sycophancy_train.txt"}},
}


def _report() -> dict:
    """A held-out report with numbers no default could produce."""
    return HeldOutReport(
        samples_per_arm=16, reward_on=0.5678, reward_on_se=0.0222, reward_off=-0.1234, reward_off_se=0.0111,
        difference=0.6912, difference_se=0.0248, paired_se=0.0199, kl_per_token=0.0421, kl_per_reply=1.337,
        length_on=30.5, length_off=28.25, judge_failed=0,
        evaluation_judge={"description": "eval", "reward_on": 0.21, "reward_on_se": 0.011, "reward_off": 0.18,
                          "reward_off_se": 0.012, "difference": 0.03, "difference_se": 0.016, "paired_se": 0.015},
    ).as_dict()


def _vector(hidden: int = 64, seed: int = 0, step: int = 4) -> tuple[SteeringVector, dict]:
    torch.manual_seed(seed)
    vector = SteeringVector(hidden).load_(torch.randn(hidden), torch.tensor(1.5))
    meta = {"base_model": "embedded:smollm2", "hook_layer": 1, "hook_point": "post_attn_norm",
            "steer_positions": "all", "step": step, "config": {"lr": 0.1}}
    return vector, meta


@pytest.fixture
def run(tmp_path) -> Path:
    """A finished SteeringVectorRL run folder: config, final vector, an earlier one, the report of update 4."""
    folder = tmp_path / "runs" / "hub_test"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    save_steering_vector(folder / "steering_vector.pt", *_vector(step=4))
    save_steering_vector(folder / "vectors" / "update000002.pt", *_vector(seed=1, step=2))
    write_json_atomically(folder / "heldout_update000004.json", _report())
    return folder


# -- the card ------------------------------------------------------------------------------------
def test_card_metadata_round_trips_and_text_holds_the_report(run):
    card = model_card(find_artifact(run), "me/sycophancy-vector")
    data = card.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and data["license"] == "apache-2.0"
    assert data["library_name"] == "rl-insides"
    assert {"rl-insides", "steering-vector-rl", "steering-vector"} <= set(data["tags"])
    again = ModelCard(str(card))  # the library parses the README back
    assert again.data.to_dict() == data
    assert ModelCardData(**data, ignore_metadata_errors=False).to_dict() == data
    text = card.text
    for figure in ("-0.1234 ± 0.0111", "+0.5678 ± 0.0222", "+0.6912 ± 0.0248", "+27.9 SE", "paired SE 0.0199",
                   "+0.0300 ± 0.0150 (paired)", "0.0421 per token", "16 samples per arm"):
        assert figure in text, figure
    for fact in ("SteeringVectorRL", "layer 1", "`post_attn_norm`", "OpenAICompatibleJudge(", "judge-org/judge-7b",
                 "reward_mode `loglik`", "You flatter the user.", "python cli.py fit --config config.yaml",
                 "run `hub_test`", 'load_steered_model("me/sycophancy-vector")', "heldout_update000004.json"):
        assert fact in text, fact


def test_an_earlier_vector_gets_no_report_of_another_update(run):
    artifact = find_artifact(run / "vectors" / "update000002.pt")
    assert artifact.run_dir == run and artifact.update == 2 and artifact.report_file is None
    assert "No held-out report" in model_card(artifact, "me/v").text
    bare = find_artifact(run / "steering_vector.pt")
    bare.run_dir, bare.config, bare.report_file = None, {}, None  # a vector file alone
    text = model_card(bare, "me/v").text
    assert "not recorded" in text and "layer 1" in text


# -- the upload, up to the library's call boundary ---------------------------------------------------
class Recorder:
    """Stands in for the HfApi methods a push calls; records what they were given."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.files: dict[str, bytes] = {}

    def install(self, monkeypatch) -> "Recorder":
        def create_repo(api, repo_id, **kw):
            self.calls.append(("create_repo", (repo_id,), kw))
            return f"https://huggingface.co/{repo_id}"

        def update_repo_settings(api, repo_id, **kw):
            self.calls.append(("update_repo_settings", (repo_id,), kw))

        def upload_folder(api, **kw):
            self.calls.append(("upload_folder", (), kw))
            root = Path(kw["folder_path"])  # read now: the folder is temporary
            self.files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

        for name, fn in (("create_repo", create_repo), ("update_repo_settings", update_repo_settings),
                         ("upload_folder", upload_folder)):
            monkeypatch.setattr(HfApi, name, fn)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # every network call above is replaced
        monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
        return self

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


def test_push_sends_the_staged_folder_and_never_the_token(run, monkeypatch, capsys):
    sent = Recorder().install(monkeypatch)
    hub_push_command(["--run", str(run), "--repo_id", "me/vec", "--private"])
    assert sent.names() == ["create_repo", "update_repo_settings", "upload_folder"]
    (_, args, create), (_, _, settings), (_, _, upload) = sent.calls
    assert args == ("me/vec",) and create == {"private": True, "exist_ok": True}
    assert settings == {"private": True} and upload["repo_id"] == "me/vec"
    assert not any("token" in kw for _, _, kw in sent.calls)  # the library finds the token itself
    assert set(sent.files) == {"README.md", "config.yaml", "heldout_report.json", "steering_vector.pt",
                               "steering_vector.safetensors"}
    assert all(FAKE_TOKEN.encode() not in data for data in sent.files.values())
    assert "+0.6912 ± 0.0248" in sent.files["README.md"].decode()
    assert json.loads(sent.files["heldout_report.json"])["reward_on"] == 0.5678
    assert "pushed to https://huggingface.co/me/vec" in capsys.readouterr().out


def test_push_public_leaves_visibility_alone_and_sends_an_adapter(adapter_run, monkeypatch):
    sent = Recorder().install(monkeypatch)
    push_to_hub(adapter_run, "me/lora")
    assert sent.names() == ["create_repo", "upload_folder"] and sent.calls[0][2]["private"] is False
    assert {"adapter_config.json", "adapter_model.safetensors", "value_head.pt", "README.md", "config.yaml"} <= set(
        sent.files)
    config = json.loads(sent.files["adapter_config.json"])
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # not a local cache path
    card = ModelCard(sent.files["README.md"].decode())
    assert card.data.library_name == "peft" and "ppo" in card.data.tags
    assert "r = 4, alpha = 8" in card.text and "q_proj, v_proj" in card.text and "| trained for | 6 updates |" in card.text
    assert "| | adapter off | adapter on | on − off |" in card.text and "heldout_report.json" in sent.files
    assert "PersonaReward(mode=contrast, LocalJudge(the policy's own weights))" in card.text


def test_a_file_holding_the_token_is_never_sent(run, monkeypatch):
    sent = Recorder().install(monkeypatch)
    config = dict(CONFIG, note=f"my token is {FAKE_TOKEN}")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match=r"refusing to upload: config.yaml holds the value of \$HF_TOKEN") as err:
        push_to_hub(run, "me/vec")
    assert FAKE_TOKEN not in str(err.value) and sent.calls == []


def test_push_offline_and_bad_input_are_one_line(run, monkeypatch):
    sent = Recorder().install(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        push_to_hub(run, "me/vec")
    with pytest.raises(UserError, match="not a Hub repo id"):
        hub_push_command(["--run", str(run), "--repo_id", "me/vec@main"])
    with pytest.raises(UserError, match="exactly one of"):
        hub_push_command(["--run", str(run), "--vector", str(run / "steering_vector.pt"), "--repo_id", "me/v"])
    with pytest.raises(UserError, match="is a steering vector, not a PEFT adapter"):
        hub_push_command(["--adapter", str(run / "steering_vector.pt"), "--repo_id", "me/v"])
    assert sent.calls == []


def test_a_refused_token_is_one_line_and_the_library_sends_it_from_the_environment(run, monkeypatch):
    """The real HfApi against a server on 127.0.0.1 that answers every request with HTTP 401."""
    seen = []

    class Refuse(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            self.rfile.read(int(self.headers.get("content-length") or 0))
            seen.append(self.headers.get("authorization"))
            self.send_response(401)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "Invalid credentials"}')

        do_GET = do_POST = do_PUT = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    try:
        with pytest.raises(UserError, match=r"refused the push to 'me/vec' \(HTTP 401\): check HF_TOKEN") as err:
            push_to_hub(run, "me/vec", api=HfApi(endpoint=f"http://127.0.0.1:{server.server_port}"))
    finally:
        server.shutdown()
    assert seen and seen[0] == f"Bearer {FAKE_TOKEN}" and "\n" not in str(err.value)


def test_dry_run_writes_the_folder_and_prints_its_path(run, tmp_path, capsys):
    out = tmp_path / "staged"
    hub_push_command(["--vector", str(run / "steering_vector.pt"), "--repo_id", "me/vec", "--dry_run",
                      "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert str(out) in printed and "nothing sent" in printed
    assert (out / "README.md").is_file() and (out / "steering_vector.safetensors").is_file()
    staged, original = read_steering_vector(out / "steering_vector.safetensors"), read_steering_vector(run)
    assert torch.equal(staged["v"], original["v"]) and staged["metadata"] == original["metadata"]
    with pytest.raises(UserError, match="not empty"):
        hub_push_command(["--run", str(run), "--repo_id", "me/vec", "--dry_run", "--output_dir", str(out)])


# -- loading by Hub id from the local cache ----------------------------------------------------------
def put_in_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str = "a" * 40) -> str:
    """Lay ``files`` (path in repo -> local file) out as huggingface_hub's cache does: content in
    ``blobs/<sha256>``, ``snapshots/<commit>/<path>`` links to it, ``refs/main`` names the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for name, source in files.items():
        data = Path(source).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(Path(name).parts) + 1), "blobs", blob.name))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both variables when it is imported, long before this test
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(["I am right about the moon, agreed?"], return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def test_load_by_hub_id_steers_like_the_local_file(run, offline_cache, tmp_path, tiny_llama_dir):
    staged = tmp_path / "staged"
    hub_push_command(["--run", str(run), "--repo_id", "owner/name", "--dry_run", "--output_dir", str(staged)])
    commit = put_in_cache(offline_cache, "owner/name", {
        "steering_vector.pt": staged / "steering_vector.pt", "README.md": staged / "README.md",
        "steering_vector.safetensors": staged / "steering_vector.safetensors",
        "vectors/update000002.pt": run / "vectors" / "update000002.pt"})
    local_model, tokenizer, local = load_steered_model(run / "steering_vector.pt", model=tiny_llama_dir, dtype="float32")
    hub_model, _, hub = load_steered_model("owner/name", model=tiny_llama_dir, dtype="float32")
    steered = _logits(hub_model, tokenizer)
    assert torch.equal(steered, _logits(local_model, tokenizer))
    with hub.disabled():
        assert not torch.allclose(steered, _logits(hub_model, tokenizer), atol=1e-4)  # the vector does something
    for spec in ("owner/name:steering_vector.safetensors", f"owner/name@{commit}", "owner/name@main"):
        assert torch.equal(read_steering_vector(spec)["v"], read_steering_vector(run)["v"]), spec
    earlier = read_steering_vector("owner/name:vectors/update000002.pt")
    assert torch.equal(earlier["v"], read_steering_vector(run / "vectors" / "update000002.pt")["v"])


def test_unknown_hub_id_offline_is_one_clear_line(offline_cache):
    for call in (lambda: load_steered_model("owner/missing"), lambda: resolve_adapter_folder("owner/missing")):
        with pytest.raises(UserError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and "owner/missing" in message and "HF_HUB_OFFLINE is set" in message
    with pytest.raises(UserError, match="does not exist"):
        load_steered_model("./no/such/vector.pt")


@pytest.fixture
def adapter_run(tmp_path, tiny_llama_dir) -> Path:
    """A PPO run folder with a saved adapter whose B matrices are not zero (so loading can be told apart)."""
    folder = tmp_path / "runs" / "ppo"
    base, _ = load_causal_lm(tiny_llama_dir, "float32")
    lora = LoRAPolicy(base, r=4, alpha=8, target_modules="q_proj,v_proj", keep_reference=False)
    torch.manual_seed(3)
    with torch.no_grad():
        for param in lora.trainable_state().values():
            param.copy_(torch.randn_like(param))
    lora.save(folder / "adapter", {"value_head.pt": {"w": torch.ones(2)}})
    config = {"run_name": "ppo", "model": {"class_path": "modules.ppo.PPO", "init_args": {
        "model": "embedded:smollm2", "lora_r": 4, "lora_alpha": 8, "reward": {
            "class_path": "modules.judges.rewards.PersonaReward", "init_args": {
                "mode": "contrast", "persona": "You are honest.",
                "judge": {"class_path": "modules.judges.local.LocalJudge", "init_args": {"model": None}}}}}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    write_json_atomically(folder / "heldout_update000006.json", dict(_report(), arm_names=["adapter off", "adapter on"]))
    torch.save(lora.trainable_state(), folder / "trained.pt")
    return folder


def test_adapter_path_as_hub_id_loads_the_same_weights(adapter_run, offline_cache, tiny_llama_dir):
    adapter = adapter_run / "adapter"
    put_in_cache(offline_cache, "owner/lora", {p.name: p for p in adapter.iterdir() if p.is_file()})
    base, _ = load_causal_lm(tiny_llama_dir, "float32")
    loaded = LoRAPolicy(base, "owner/lora", keep_reference=False).trainable_state()
    trained = torch.load(adapter_run / "trained.pt")
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert resolve_adapter_folder(str(adapter)) == adapter  # a local path stays local


@pytest.mark.parametrize("spec, parsed", [
    ("owner/name", HubSpec("owner/name")),
    ("owner/name@v1.0", HubSpec("owner/name", "v1.0")),
    ("owner/name:vectors/update000010.pt", HubSpec("owner/name", None, "vectors/update000010.pt")),
    ("owner/name@refs/pr/1:adapters/update000003", HubSpec("owner/name", "refs/pr/1", "adapters/update000003")),
    ("./owner/name", None), ("/abs/path.pt", None), ("~/x/y", None), ("a/b/c", None), ("vector.pt", None),
])
def test_parse_hub_spec(spec, parsed):
    assert parse_hub_spec(spec) == parsed
