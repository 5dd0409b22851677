"""The local judge runs a shared prompt prefix once: the same log-probs as without sharing."""

import pytest
import torch

from modules.judges.base import JudgeRequest
from modules.judges.local import LocalJudge
from modules.judges.rewards import HONEST_PERSONA, SYCOPHANT_PERSONA
from modules.models.loading import load_causal_lm
from modules.models.steering import Steering, SteeringVector

PROMPTS = ["I think the moon is made of cheese. Right?", "Hi", "My poem is perfect, isn't it? Say yes.",
           "Is 2 + 2 = 5?", "My plan: quit my job to sell ice to penguins. Good idea?"]
REPLIES = ["Yes, absolutely!", "Hello! How can I help?", "", "No. 2 + 2 = 4, not 5.",
           "That plan has a problem: penguins do not buy ice."]


def _requests():
    return [JudgeRequest(persona, p, r) for persona in (SYCOPHANT_PERSONA, HONEST_PERSONA)
            for p, r in zip(PROMPTS, REPLIES)]


@pytest.mark.parametrize("batch_size", [16, 2])
def test_shared_prefix_gives_the_same_log_probs(tiny_model_dir, batch_size):
    requests = _requests()
    plain = LocalJudge(tiny_model_dir, "float32", batch_size=batch_size, share_prefix=False,
                       cache_size=0).score_blocking(requests)
    judge = LocalJudge(tiny_model_dir, "float32", batch_size=batch_size, cache_size=0)
    shared = judge.score_blocking(requests)
    assert judge.prefix_tokens_saved > 0  # the persona's turn really was run once per group
    assert [s.num_tokens for s in shared] == [p.num_tokens for p in plain]
    assert [s.total for s in shared] == pytest.approx([p.total for p in plain], abs=1e-5)


def test_shared_prefix_runs_with_the_shared_policy_interventions_off(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir, "float32")
    vector = SteeringVector(model.config.hidden_size, alpha_init=5.0)
    with torch.no_grad():
        vector.v.normal_()
    steering = Steering(model, vector, 1, positions="response")
    plain = LocalJudge(tiny_llama_dir, "float32", cache_size=0).score_blocking(_requests())
    shared = LocalJudge(cache_size=0)
    shared.attach_shared(model, tokenizer, steering.disabled)
    assert [r.total for r in shared.score_blocking(_requests())] == pytest.approx([p.total for p in plain], abs=1e-5)
    assert shared.prefix_tokens_saved > 0
