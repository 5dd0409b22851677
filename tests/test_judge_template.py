"""A base model (no chat template) as a local judge: the judge's ``chat_template`` option.

The judge's score of a labelled pair under a given template equals the log-probs of a prompt built
here by hand, through a plain forward pass; a judge with no template to use stops with one line
naming the option; the option reaches the judge from a YAML config and from the command line; the
remote judge's snippet in docs/judges.md parses; benchmarks/judge_validity.py keeps judge and policy
apart.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from argparse import Namespace
from contextlib import nullcontext
from pathlib import Path

import jsonargparse
import pytest
import torch
import torch.nn.functional as F
import yaml

from modules.errors import UserError
from modules.judges.base import Judge, JudgeRequest
from modules.judges.chat_format import PLAIN_TEMPLATE, render_chat_prefix
from modules.judges.local import LocalJudge
from modules.judges.rewards import SYCOPHANT_PERSONA
from modules.models.loading import load_causal_lm

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "I think the moon is made of cheese. Right?"
PAIR = ("Yes, you're absolutely right, what a brilliant thought!",  # sycophantic
        "No. The moon is rock: its crust is mostly feldspar and basalt.")  # honest
JINJA = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}[reply]\n{% endif %}")
# the text each template gives the persona and the prompt, written out by hand
BY_HAND = {
    "plain": f"{SYCOPHANT_PERSONA}\n\nUser: {PROMPT}\nAssistant:\n",
    "jinja": f"[system] {SYCOPHANT_PERSONA}\n[user] {PROMPT}\n[reply]\n",
}


@pytest.fixture(scope="module")
def base_model_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with its chat template removed: a base model, as far as the judge can tell."""
    folder = tmp_path_factory.mktemp("tiny_base") / "model"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert not load_causal_lm(str(folder), "float32")[1].chat_template
    return str(folder)


def _by_hand(model, tokenizer, prefix: str, response: str) -> tuple[float, int]:
    """Summed log-prob of ``response`` after ``prefix``, from one plain forward pass."""
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prefix + response, add_special_tokens=False)["input_ids"]
    assert ids[: len(prefix_ids)] == prefix_ids  # the template ends on a token boundary
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = F.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    return float(logp[len(prefix_ids) - 1 :].sum()), len(ids) - len(prefix_ids)


@pytest.mark.parametrize("form", ["plain", "jinja string", "jinja file"])
def test_a_base_model_judge_scores_a_pair_as_a_hand_built_prompt(base_model_dir, tmp_path, form):
    option = {"plain": "plain", "jinja string": JINJA}.get(form)
    if form == "jinja file":
        option = str(tmp_path / "judge.jinja")
        (tmp_path / "judge.jinja").write_text(JINJA)
    judge = LocalJudge(base_model_dir, "float32", cache_size=0, chat_template=option)
    results = judge.score_blocking([JudgeRequest(SYCOPHANT_PERSONA, PROMPT, reply) for reply in PAIR])
    assert judge.prefix_tokens_saved > 0  # the pair's shared prefix (persona and prompt) was run once
    model, tokenizer = load_causal_lm(base_model_dir, "float32")
    prefix = BY_HAND["plain" if form == "plain" else "jinja"]
    for reply, result in zip(PAIR, results):
        total, count = _by_hand(model, tokenizer, prefix, reply)
        assert result.num_tokens == count
        assert result.total == pytest.approx(total, abs=1e-4)
    # the shared policy's weights with the same template: the same scores
    shared = LocalJudge(cache_size=0, chat_template=option)
    shared.attach_shared(model, tokenizer, nullcontext)
    again = shared.score_blocking([JudgeRequest(SYCOPHANT_PERSONA, PROMPT, reply) for reply in PAIR])
    assert [r.total for r in again] == pytest.approx([r.total for r in results], abs=1e-5)


def test_the_template_replaces_a_chat_models_own(tiny_llama_dir):
    own = LocalJudge(tiny_llama_dir, "float32", cache_size=0)
    plain = LocalJudge(tiny_llama_dir, "float32", cache_size=0, chat_template="plain")
    request = [JudgeRequest(SYCOPHANT_PERSONA, PROMPT, PAIR[0])]
    model, tokenizer = load_causal_lm(tiny_llama_dir, "float32")
    by_hand = _by_hand(model, tokenizer, BY_HAND["plain"], PAIR[0])[0]
    assert plain.score_blocking(request)[0].total == pytest.approx(by_hand, abs=1e-4)
    assert own.score_blocking(request)[0].total != pytest.approx(by_hand, abs=1e-2)
    assert own.identity == f"local:{tiny_llama_dir}" and plain.identity.endswith(":template=plain")


class _BosTokenizer:
    """Stands for a tokenizer that puts BOS (id 2) before plain text, as Gemma's and Llama's do."""

    bos_token_id, chat_template = 2, None

    def __call__(self, text):
        return {"input_ids": [2, 7]}

    def apply_chat_template(self, messages, chat_template, add_bos, **kwargs):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(chat_template).render(messages=messages, bos_token="<bos>", add_bos=add_bos, **kwargs)


def test_plain_opens_with_bos_only_where_the_tokenizer_puts_one(tokenizer_dir):
    from transformers import AutoTokenizer

    assert render_chat_prefix(_BosTokenizer(), "S", "U", PLAIN_TEMPLATE) == "<bos>S\n\nUser: U\nAssistant:\n"
    smollm2 = AutoTokenizer.from_pretrained(tokenizer_dir)  # puts no BOS before plain text
    assert render_chat_prefix(smollm2, "S", "U", PLAIN_TEMPLATE) == "S\n\nUser: U\nAssistant:\n"
    assert render_chat_prefix(smollm2, "", "U", PLAIN_TEMPLATE) == "User: U\nAssistant:\n"


def test_no_template_to_use_is_one_line_naming_the_option(base_model_dir, tmp_path):
    with pytest.raises(UserError, match=r"no chat template .*set the judge's chat_template to 'plain'"):
        LocalJudge(base_model_dir, "float32")
    shared = LocalJudge()
    shared.attach_shared(*load_causal_lm(base_model_dir, "float32"), nullcontext)
    with pytest.raises(UserError, match="the policy model the judge shares has no chat template"):
        shared.preflight()
    with pytest.raises(UserError, match="chat_template file 'missing.jinja' does not exist"):
        LocalJudge(chat_template="missing.jinja")
    with pytest.raises(UserError, match="chat_template 'chatml-ish' is not a named template"):
        LocalJudge(chat_template="chatml-ish")
    broken = LocalJudge(base_model_dir, "float32", chat_template="{% for m in messages %}{{ m['content'] }}")
    with pytest.raises(UserError, match="the judge's chat template does not render"):
        broken.score_blocking([JudgeRequest("S", "U", "R")])


def test_the_option_reaches_the_judge_from_yaml_and_the_command_line(base_model_dir):
    """The judge is a ``Judge`` argument given as class_path + init_args, as in configs/*.yaml
    (LightningCLI parses the methods' ``judge`` fields with the same jsonargparse machinery)."""
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_argument("--judge", type=Judge)
    snippet = f"""
judge:
  class_path: modules.judges.local.LocalJudge
  init_args:
    model: {base_model_dir}
    dtype: float32
    chat_template: plain
"""
    from_yaml = parser.instantiate_classes(parser.parse_string(snippet)).judge
    from_flags = parser.instantiate_classes(parser.parse_args(
        ["--judge", "modules.judges.local.LocalJudge", f"--judge.model={base_model_dir}", "--judge.dtype=float32",
         "--judge.chat_template", JINJA])).judge
    assert isinstance(from_yaml, LocalJudge) and from_yaml.chat_template == "plain"
    assert from_flags.chat_template == JINJA
    model, tokenizer = load_causal_lm(base_model_dir, "float32")
    for judge, prefix in ((from_yaml, BY_HAND["plain"]), (from_flags, BY_HAND["jinja"])):
        result = judge.score_blocking([JudgeRequest(SYCOPHANT_PERSONA, PROMPT, PAIR[1])])[0]
        assert result.total == pytest.approx(_by_hand(model, tokenizer, prefix, PAIR[1])[0], abs=1e-4)


def test_the_remote_judge_snippet_in_the_docs_uses_real_option_names():
    """docs/judges.md shows a remote judge as one YAML snippet: it must parse into the judge it names."""
    from modules.judges.openai_compat import OpenAICompatibleJudge

    docs = (ROOT / "docs" / "judges.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", docs, re.S) if "OpenAICompatibleJudge" in b]
    assert len(blocks) == 1
    judge_config = yaml.safe_load(blocks[0])["model"]["init_args"]["eval_judge"]
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--judge", type=Judge)
    judge = parser.instantiate_classes(parser.parse_object({"judge": judge_config})).judge
    assert isinstance(judge, OpenAICompatibleJudge) and judge.mode == "rating"
    assert judge.base_url == judge_config["init_args"]["base_url"]


def _benchmark():
    """benchmarks/judge_validity.py as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("judge_validity", ROOT / "benchmarks" / "judge_validity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_takes_its_judge_as_options_apart_from_the_policy(tiny_llama_dir, base_model_dir):
    judge_and_policy = _benchmark().judge_and_policy
    options = dict(dtype="float32", device="cpu", judge_chat_template="plain", policy_model=tiny_llama_dir)
    judge, policy = judge_and_policy(Namespace(judge_model=base_model_dir, prompted=0, **options))
    assert policy is None and judge.model_name == base_model_dir and judge.chat_template == "plain"
    judge, policy = judge_and_policy(Namespace(judge_model=base_model_dir, prompted=4, **options))
    assert judge._model is not policy[0]  # a judge of another model: its own weights, the policy answers
    judge, policy = judge_and_policy(Namespace(judge_model=tiny_llama_dir, prompted=4, **options))
    assert judge._model is policy[0] and judge.chat_template == "plain"  # the same model: shared weights


def test_the_training_cli_takes_the_option(capsys):
    """``cli.py fit`` parses ``--model.judge.chat_template`` into the judge's init_args (printed, not run)."""
    from cli import main

    config_file = ROOT / "configs" / "steering_rl_smollm2.yaml"
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config_file), "--model.judge.chat_template", "plain", "--print_config"])
    assert stop.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    judge = config["model"]["init_args"]["judge"]
    assert judge["class_path"] == "modules.judges.local.LocalJudge"
    assert judge["init_args"]["chat_template"] == "plain"
