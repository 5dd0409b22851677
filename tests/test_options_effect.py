"""Every option proves it does something.

One test per option: the option on and off (or two values) on the SAME inputs, seeds and starting
weights, and an assertion on a difference that only that option explains (a loss, a gradient, an
advantage, a parameter after an update, the forward calls of the update), plus which of the two
the default is (a run with the default, or the constructor's signature). Where the option is consumed
by a pure function of :mod:`modules.rl` the math is checked on hand-built tensors; the module part
proves the wiring (the constructor's option reaches the math).

Tests are written against behaviour, not metric names or private attributes, where possible.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from modules.models.steering import decoder_layers
from modules.on_policy import Experience
from modules.ppo import PPO
from modules.rewards import Rewards
from modules.rl import grpo
from modules.rl import ppo as ppo_math
from modules.rollout import Rollout
from tests.helpers import PROMPTS, LengthJudge, fit, tiny_module

ROOT = Path(__file__).resolve().parents[1]
PROMPT_IDS = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 13, 14, 15, 16]])
RESPONSE_IDS = torch.tensor([[20, 21, 22, 2], [23, 24, 0, 0], [25, 26, 27, 28]])
RESPONSE_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
SCORES = (1.0, -0.5, 2.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared, loaded machine the threads'
    waiting makes every matmul ~100x slower; restored afterwards for the rest of the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fixed_rollout() -> Rollout:
    """Three prompts with replies of 4, 2 and 4 tokens (left-padded prompts, right-padded replies)."""
    return Rollout(["a", "b", "c"], PROMPT_IDS, (PROMPT_IDS != 0).long(), RESPONSE_IDS, RESPONSE_MASK,
                   ["x", "y", "z"])


def length_reward():
    from modules.judges.rewards import PersonaReward

    return PersonaReward(LengthJudge(), "loglik", "S", "H", length_normalize=False)


def tiny_ppo(model_dir: str, moved_adapter: bool = True, value_head: bool = False, **overrides) -> PPO:
    """A tiny PPO whose starting weights depend only on the seed: the same in every call.

    ``moved_adapter`` sets LoRA's B (zero in a fresh adapter, which makes the adapter the identity:
    dropout on its input and the gradient of its A would then be zero) to fixed values;
    ``value_head`` gives the value head (zero in a fresh one) fixed weights."""
    options = dict(model=model_dir, dtype="float32", reward=length_reward(), lora_r=4, max_new_tokens=3,
                   batch_size=2, grad_accum=1, total_updates=1, lr=1e-2, ppo_epochs=1, num_minibatches=1)
    options.update(overrides)
    torch.manual_seed(0)
    module = PPO(**options)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if moved_adapter:
            for name, param in sorted(module.policy.named_parameters()):
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        if value_head:
            module.value_head.linear.weight.copy_(torch.randn(module.value_head.linear.weight.shape,
                                                              generator=generator) * 0.1)
    return module


def default_of(option: str):
    """PPO's default for ``option`` (the value the on/off comparisons below pin)."""
    return inspect.signature(PPO).parameters[option].default


def scored(module, rollout: Rollout | None = None, scores=SCORES) -> Experience:
    """Score pass and advantages over ``rollout`` with the given (valid) rewards."""
    rollout = rollout or fixed_rollout()
    n = len(rollout.prompts)
    experience = Experience(rollout, Rewards(torch.tensor(scores[:n]), torch.ones(n, dtype=torch.bool)),
                            torch.arange(n))
    with torch.no_grad():
        module.score(experience)
    module.compute_advantages(experience)
    return experience


def lora_grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.policy.named_parameters()
            if p.requires_grad and p.grad is not None}


def grads_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], **tol) for k in a)


def reward_to_go(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_{s >= t} r_s within the mask (GAE's returns with gamma = lam = 1, whatever the values)."""
    r = token_rewards * mask
    return r.flip(-1).cumsum(-1).flip(-1) * mask


def whiten_by_hand(x: torch.Tensor, mask: torch.Tensor, keep_mean: bool = False) -> torch.Tensor:
    values = x[mask.bool()]
    mean, std = values.mean(), values.var(unbiased=True).add(1e-8).sqrt()
    out = (x - mean) / std + (mean if keep_mean else 0.0)
    return out * mask


def last_token_rewards(scores, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards with no KL part: each row's score on its last response token."""
    out = torch.zeros(mask.shape)
    for row, score in enumerate(scores):
        out[row, int(mask[row].sum()) - 1] = score
    return out


# -- PPO: rewards and advantages -------------------------------------------------------------------

def test_whiten_rewards_whitens_the_per_token_rewards_keeping_their_mean(tiny_llama_dir):
    """With gamma = lam = 1 and no KL reward, the returns are the reward-to-go of the per-token
    rewards: the raw scores without whitening, the whitened (mean kept) rewards with it."""
    common = dict(kl_coef=0.0, gamma=1.0, lam=1.0, whiten_advantages=False)
    mask = RESPONSE_MASK.float()
    raw = last_token_rewards(SCORES, mask)
    off = scored(tiny_ppo(tiny_llama_dir, **common, whiten_rewards=False))
    on = scored(tiny_ppo(tiny_llama_dir, **common, whiten_rewards=True))
    torch.testing.assert_close(off.returns, reward_to_go(raw, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(on.returns, reward_to_go(whiten_by_hand(raw, mask, keep_mean=True), mask),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(on.returns, off.returns, atol=1e-2)
    assert not torch.allclose(on.advantages, off.advantages, atol=1e-2)
    assert default_of("whiten_rewards") is False


def test_whiten_advantages_whitens_the_gae_advantages_and_leaves_the_returns(tiny_llama_dir):
    mask = RESPONSE_MASK.float()
    off = scored(tiny_ppo(tiny_llama_dir, value_head=True, whiten_advantages=False))
    on = scored(tiny_ppo(tiny_llama_dir, value_head=True, whiten_advantages=True))
    torch.testing.assert_close(on.advantages, whiten_by_hand(off.advantages, mask), rtol=1e-5, atol=1e-5)
    tokens = on.advantages[mask.bool()]
    assert tokens.mean().abs() < 1e-5 and tokens.std() == pytest.approx(1.0, abs=1e-4)
    raw = off.advantages[mask.bool()]
    assert raw.mean().abs() > 1e-2 or abs(raw.std() - 1) > 1e-2  # the raw ones are not whitened already
    torch.testing.assert_close(on.returns, off.returns, rtol=0, atol=0)  # value targets untouched
    assert default_of("whiten_advantages") is True


# -- PPO: the loss -----------------------------------------------------------------------------------

def test_value_detach_trunk_keeps_the_value_loss_out_of_the_lora_weights(tiny_llama_dir):
    """Detached: the LoRA gradient is the one without any value loss (value_coef 0) and the value
    head's gradient is unchanged; attached: the value loss reaches the LoRA weights."""
    def gradients(**options):
        module = tiny_ppo(tiny_llama_dir, value_head=True, **options)
        loss, _ = module.minibatch_loss(scored(module))
        loss.backward()
        return lora_grads(module), module.value_head.linear.weight.grad.clone()

    attached_lora, attached_head = gradients(value_detach_trunk=False)
    detached_lora, detached_head = gradients(value_detach_trunk=True)
    no_value_lora, _ = gradients(value_coef=0.0)
    assert grads_close(detached_lora, no_value_lora, rtol=1e-5, atol=1e-8)
    assert not grads_close(attached_lora, no_value_lora, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(detached_head, attached_head, rtol=1e-5, atol=1e-8)
    assert detached_head.abs().sum() > 0


def entropy_by_hand(module, rollout: Rollout) -> torch.Tensor:
    """Token mean of the policy's entropy at the response positions, from a plain forward."""
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], 1)
    attention = torch.cat([rollout.prompt_mask, rollout.response_mask], 1)
    with torch.no_grad():
        logits = module.policy(input_ids=ids, attention_mask=attention,
                               position_ids=(attention.cumsum(-1) - 1).clamp(min=0)).logits.float()
    logits = logits[:, rollout.prompt_ids.shape[1] - 1 : -1] / module.sampling.temperature
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    mask = rollout.response_mask.bool()
    return entropy[mask].mean()


def test_entropy_coef_subtracts_that_multiple_of_the_token_mean_entropy(tiny_llama_dir):
    default = tiny_ppo(tiny_llama_dir)
    bonus = tiny_ppo(tiny_llama_dir, entropy_coef=0.1)
    rollout = fixed_rollout()
    entropy = entropy_by_hand(default, rollout)
    assert entropy > 1.0  # a random tiny model: near-uniform over 49k tokens
    loss_default, _ = default.minibatch_loss(scored(default))
    loss_bonus, _ = bonus.minibatch_loss(scored(bonus))
    # the default (0) adds nothing; 0.1 subtracts 0.1 x the entropy
    assert float(loss_default.detach() - loss_bonus.detach()) == pytest.approx(0.1 * float(entropy), rel=1e-4)
    loss_default.backward()
    loss_bonus.backward()
    assert not grads_close(lora_grads(default), lora_grads(bonus), rtol=1e-3, atol=1e-7)


def test_clip_range_value_clips_the_value_change_around_the_old_values(tiny_llama_dir):
    # the pure function: values moved by 1 from the old ones, returns 2 away
    old, values, returns = torch.zeros(1, 1), torch.ones(1, 1, requires_grad=True), torch.full((1, 1), 2.0)
    mask = torch.ones(1, 1)
    loose, _ = ppo_math.clipped_value_loss(values, old, returns, mask, clip_range_value=2.0)
    tight, clipfrac = ppo_math.clipped_value_loss(values, old, returns, mask, clip_range_value=0.2)
    assert loose.item() == pytest.approx(0.5 * 1.0) and tight.item() == pytest.approx(0.5 * 1.8 ** 2)
    assert clipfrac.item() == 1.0
    (grad_tight,) = torch.autograd.grad(tight, values)
    (grad_loose,) = torch.autograd.grad(loose, values)
    assert grad_tight.item() == 0.0 and grad_loose.item() == pytest.approx(-1.0)

    # the module: a fresh value head scores 0 (old values); moving its bias by 1 before the loss pass
    # (as an earlier step would) makes every value 1, so only the value clip tells the losses apart
    def loss_with(**options):
        module = tiny_ppo(tiny_llama_dir, **options)
        experience = scored(module)
        with torch.no_grad():
            module.value_head.linear.bias.fill_(1.0)
        loss, _ = module.minibatch_loss(experience)
        return float(loss), experience.returns

    tight_loss, returns = loss_with(clip_range_value=0.2)
    loose_loss, _ = loss_with(clip_range_value=10.0)
    valid = RESPONSE_MASK.bool()
    r = returns[valid]
    unclipped = 0.5 * ((1.0 - r) ** 2).mean()
    clipped = 0.5 * torch.maximum((1.0 - r) ** 2, (0.2 - r) ** 2).mean()
    assert clipped - unclipped > 1e-3
    assert tight_loss - loose_loss == pytest.approx(0.5 * float(clipped - unclipped), rel=1e-4)  # value_coef 0.5
    assert default_of("clip_range_value") == 0.2


def test_target_kl_ends_the_update_after_the_pass_that_exceeds_it(tiny_llama_dir, tmp_path):
    """3 epochs x 2 minibatches: the first epoch's second minibatch sees the weights after the
    first step (approximate KL > 0), so a tiny target_kl stops after that epoch; a huge one runs
    every epoch."""
    def optimizer_steps(name: str, **options) -> int:
        module = tiny_ppo(tiny_llama_dir, moved_adapter=False, ppo_epochs=3, num_minibatches=2, **options)
        return fit(module, tmp_path / name).global_step

    assert optimizer_steps("tiny", target_kl=1e-12) == 2
    assert optimizer_steps("huge", target_kl=1e6) == 6
    assert default_of("target_kl") is None  # the default never stops early


# -- LoRA dropout ----------------------------------------------------------------------------------

def test_lora_dropout_acts_in_the_loss_pass_only(tiny_llama_dir):
    plain, dropped = tiny_ppo(tiny_llama_dir), tiny_ppo(tiny_llama_dir, lora_dropout=0.5)
    plain_experience, dropped_experience = scored(plain), scored(dropped)
    # the score pass (old log-probs, values) sees no dropout: the same advantages and returns
    torch.testing.assert_close(dropped_experience.advantages, plain_experience.advantages, rtol=0, atol=0)
    torch.testing.assert_close(dropped_experience.returns, plain_experience.returns, rtol=0, atol=0)
    torch.manual_seed(1)
    plain_losses = [float(plain.minibatch_loss(plain_experience)[0]) for _ in range(2)]
    dropped_losses = [float(dropped.minibatch_loss(dropped_experience)[0]) for _ in range(2)]
    assert plain_losses[0] == plain_losses[1]
    assert dropped_losses[0] != dropped_losses[1]  # a new dropout mask per loss pass
    assert all(abs(d - plain_losses[0]) > 1e-6 for d in dropped_losses)
    # and after the loss passes, scoring (and sampling) is dropout-free again
    again = scored(dropped)
    torch.testing.assert_close(again.advantages, plain_experience.advantages, rtol=0, atol=0)


# -- the loop: update_batch_size, gradient_checkpointing; steering: train_alpha ----------------------

class StepRecorder(L.Callback):
    """The steering vector's parameters before and after training, the gradients just before each
    optimizer step, and the rows of every forward of the last decoder layer's MLP that builds a
    graph (the update's loss passes and their recomputation in backward; sampling and scoring run
    no-grad). The MLP, not the layer: the layer's own hooks stay outside the checkpoint, what runs
    inside its forward is recomputed."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []
        self.grad_forward_rows: list[int] = []
        self.checkpointing: bool | None = None
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer, module):
        def count(layer, args, kwargs):
            if torch.is_grad_enabled():
                hidden = args[0] if args else next(iter(kwargs.values()))
                self.grad_forward_rows.append(int(hidden.shape[0]))

        decoder_layers(module.policy)[-1].mlp.register_forward_pre_hook(count, with_kwargs=True)

    def on_train_start(self, trainer, module):
        policy = module.policy  # transformers 5 renamed is_gradient_checkpointing (deprecated) to:
        self.checkpointing = bool(policy.is_activation_checkpointing if hasattr(policy, "is_activation_checkpointing")
                                  else policy.is_gradient_checkpointing)
        self.before = {n: p.detach().clone() for n, p in module.steering_vector.named_parameters()}

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None})

    def on_train_end(self, trainer, module):
        self.after = {n: p.detach().clone() for n, p in module.steering_vector.named_parameters()}


def one_steering_update(model_dir: str, folder, **options) -> StepRecorder:
    """One update of the tiny steering module (2 rows, one micro-batch), gradients unclipped."""
    torch.manual_seed(0)
    module = tiny_module(model_dir, total_updates=1, max_grad_norm=0.0, alpha_init=1.5, **options)
    recorder = StepRecorder()
    fit(module, folder, [recorder])
    assert len(recorder.grads) == 1
    return recorder


@pytest.fixture(scope="module")
def baseline_update(tiny_llama_dir, tmp_path_factory) -> StepRecorder:
    """Every option at its default (train_alpha on, update_batch_size = batch_size, no checkpointing)."""
    return one_steering_update(tiny_llama_dir, tmp_path_factory.mktemp("baseline"))


def test_update_batch_size_splits_the_loss_pass_into_chunks_with_the_same_gradient(tiny_llama_dir, tmp_path,
                                                                                 baseline_update):
    chunked = one_steering_update(tiny_llama_dir, tmp_path, update_batch_size=1)
    assert baseline_update.grad_forward_rows == [2]  # default: batch_size rows per forward/backward
    assert chunked.grad_forward_rows == [1, 1]
    assert grads_close(chunked.grads[0], baseline_update.grads[0], rtol=1e-4, atol=1e-7)
    assert all(g.abs().sum() > 0 for g in chunked.grads[0].values())


def test_gradient_checkpointing_recomputes_the_decoder_layers_in_backward(tiny_llama_dir, tmp_path, baseline_update):
    checkpointed = one_steering_update(tiny_llama_dir, tmp_path, gradient_checkpointing=True)
    assert baseline_update.checkpointing is False and checkpointed.checkpointing is True
    assert baseline_update.grad_forward_rows == [2]
    assert checkpointed.grad_forward_rows == [2, 2]  # the forward, and its recomputation in backward
    assert grads_close(checkpointed.grads[0], baseline_update.grads[0], rtol=1e-5, atol=1e-8)


def test_train_alpha_decides_whether_alpha_moves(tiny_llama_dir, tmp_path, baseline_update):
    trained = baseline_update  # the default: alpha trains
    assert trained.grads[0].get("steering_vector.alpha", torch.zeros(1)).abs().item() > 0
    assert not torch.equal(trained.after["alpha"], trained.before["alpha"])

    frozen = one_steering_update(tiny_llama_dir, tmp_path, train_alpha=False)
    assert "steering_vector.alpha" not in frozen.grads[0]  # no gradient reaches it
    assert torch.equal(frozen.before["v"], trained.before["v"])  # the same start...
    assert torch.equal(frozen.after["alpha"], frozen.before["alpha"]) and frozen.after["alpha"].item() == 1.5
    assert not torch.equal(frozen.after["v"], frozen.before["v"])  # ...and the update did happen
    torch.testing.assert_close(frozen.grads[0]["steering_vector.v"], trained.grads[0]["steering_vector.v"],
                               rtol=1e-5, atol=1e-8)  # v's gradient is the same: only alpha's is gone


# -- SARM: kl_per_sample -----------------------------------------------------------------------------

def test_kl_per_sample_penalises_each_sample_by_its_own_log_ratio(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from modules.sarm.human_latents import build_human_latents, save_human_latents
    from modules.sarm.model import SARMRewardModel
    from modules.sarm.random_sarm import write_random_sarm
    from modules.sarm.reward import SARMReward
    from modules.sarm.shaping import kl_penalty

    logits = torch.tensor([1.0, -2.0, 4.0])
    assert kl_penalty(logits, 0.5, per_sample=True).tolist() == [0.5, -1.0, 2.0]
    assert kl_penalty(logits, 0.5, per_sample=False).tolist() == [0.5, 0.5, 0.5]

    sarm = str(write_random_sarm(tmp_path / "sarm", hidden_size=32, layers=2, latent_size=48, k=8,
                                 tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir), use_topk=False, seed=5))
    demos = tmp_path / "demos.jsonl"
    replies = ["No, that is wrong.", "Let me check.", "It has issues.", "Not quite."] * 2
    demos.write_text("\n".join(json.dumps({"prompt": p, "response": r}) for p, r in zip(PROMPTS, replies)))
    human = save_human_latents(build_human_latents(SARMRewardModel.load(sarm, device="cpu"), str(demos),
                                                   list(range(8)), progress=False), tmp_path / "human.pt")
    responses = ["No, it is round.", "Yes, absolutely, you are right!", "It has a few issues.", "Totally!"]
    rollout = Rollout(PROMPTS[:4], torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1, dtype=torch.long),
                      torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1, dtype=torch.long), responses)
    options = dict(device="cpu", kl_beta=0.5, human_latents=str(human), disc_hidden=16, disc_batch_size=4)
    per_sample = SARMReward(sarm, kl_per_sample=True, **options).score(rollout)
    batch = SARMReward(sarm, kl_per_sample=False, **options).score(rollout)
    default = SARMReward(sarm, **options).score(rollout)
    logit = per_sample.parts["kl_logit"]
    torch.testing.assert_close(batch.parts["kl_logit"], logit)  # the same discriminator, the same estimate
    assert logit.std() > 1e-4  # the samples' log-ratios differ
    sarm_reward = per_sample.parts["sarm"]
    torch.testing.assert_close(per_sample.values, sarm_reward - 0.5 * logit)
    torch.testing.assert_close(batch.values, sarm_reward - 0.5 * logit.mean())
    assert per_sample.values.mean() == pytest.approx(float(batch.values.mean()), abs=1e-5)  # the same total
    assert not torch.allclose(per_sample.values, batch.values, atol=1e-4)
    torch.testing.assert_close(default.values, per_sample.values, rtol=0, atol=0)  # default: per sample


# -- GRPO: epsilon_high ------------------------------------------------------------------------------

def test_epsilon_high_raises_only_the_upper_clip_bound(tiny_llama_dir, tmp_path, monkeypatch):
    # the pure function: ratio 1.25 with A > 0 lies above 1 + eps (0.2) and below 1 + eps_high (0.28)
    old, mask, valid = torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([True])

    def token_loss(ratio: float, advantage: float, eps_high: float | None):
        logp = torch.full((1, 1), math.log(ratio), requires_grad=True)
        terms = grpo.grpo_token_loss(logp, old, None, torch.tensor([advantage]), mask, valid, eps_low=0.2,
                                     eps_high=eps_high)
        (grad,) = torch.autograd.grad(terms.loss.sum(), logp)
        return terms.loss.item(), grad.item(), terms.clipped.item()

    assert token_loss(1.25, 1.0, None) == pytest.approx((-1.2, 0.0, 1.0))  # clipped at 1 + eps
    assert token_loss(1.25, 1.0, 0.28) == pytest.approx((-1.25, -1.25, 0.0))  # not clipped
    assert token_loss(1.35, 1.0, 0.28) == pytest.approx((-1.28, 0.0, 1.0))  # clipped at 1 + eps_high
    assert token_loss(0.7, -1.0, None) == token_loss(0.7, -1.0, 0.28)  # the lower bound is eps's alone

    # the module: OracleGRPO's epsilon_high reaches the objective. Its first pass has ratio 1, so the
    # per-token loss is evaluated as if the policy had moved to ratio 1.25 on every token
    from transformers import AutoModelForCausalLM

    from datamodules.prompts import encode_prompts, read_records
    from modules.models.adapters import LoRAPolicy
    from modules.oracle_grpo import OracleGRPO

    lora = LoRAPolicy(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), r=4)
    adapter = str(lora.save(tmp_path / "start"))
    seen: list[tuple[float, float | None]] = []
    real = grpo.grpo_token_loss

    def moved(logp, old_logp, ref_logp, advantages, response_mask, valid, eps_low=0.2, eps_high=None, beta=0.0):
        seen.append((eps_low, eps_high))
        return real(logp, logp.detach() - math.log(1.25), ref_logp, advantages, response_mask, valid, eps_low,
                    eps_high, beta)

    monkeypatch.setattr(grpo, "grpo_token_loss", moved)

    def oracle(**options) -> OracleGRPO:
        torch.manual_seed(0)
        return OracleGRPO(model=tiny_llama_dir, dtype="float32", adapter_path=adapter, batch_size=4,
                          samples_per_prompt=2, max_new_tokens=4, num_positions=2, reward=length_reward(),
                          format_system_prompt="Reply as [epistemic status: X] Answer.", **options)

    oracles = {"default": oracle(), "high": oracle(epsilon_high=0.28)}
    records = read_records(str(ROOT / "datamodules" / "data" / "oracle_train.jsonl"), "question")[:2]
    prompts = encode_prompts(oracles["default"].tokenizer, [r["prompt"] for r in records])
    prompts.records = records
    rollout = oracles["default"].rollout_micro_batch(prompts.repeat(2), seed=0)
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0])  # advantages +-0.5, +-1 (scale_rewards none)
    losses = {}
    for name, module in oracles.items():
        experience = Experience(rollout, Rewards(rewards, torch.ones(4, dtype=torch.bool)), torch.tensor([0, 0, 1, 1]))
        module.compute_advantages(experience)
        totals = grpo.update_totals([rollout.response_mask], [experience.valid], module.sampling.max_new_tokens)
        losses[name] = float(module.chunk_loss(experience, 0, totals)[0])
    assert seen == [(0.2, 0.2), (0.2, 0.28)]
    # dr_grpo: token sum / (replies x max_new_tokens); only tokens with A > 0 change, by 0.05 x A each
    lengths = rollout.response_mask.sum(-1).float()
    positive = torch.tensor([0.5, 0.0, 1.0, 0.0])
    expected = 0.05 * float((positive * lengths).sum()) / (4 * 4)
    assert losses["default"] - losses["high"] == pytest.approx(expected, rel=1e-4)


def test_generation_batch_size_sets_the_rows_per_generate_call_and_nothing_else(tiny_llama_dir, tmp_path):
    def generate_calls(folder, **options):
        torch.manual_seed(0)
        module = tiny_module(tiny_llama_dir, total_updates=1, batch_size=1, grad_accum=2, **options)
        calls, sample = [], module.rollout_micro_batch

        def counted(prompts, seed):
            calls.append(len(prompts.prompts))
            return sample(prompts, seed)

        module.rollout_micro_batch = counted
        recorder = StepRecorder()
        fit(module, folder, [recorder])
        return calls, recorder, module.last_experiences[0]

    default_calls, default_step, default_rows = generate_calls(tmp_path / "default")
    whole_calls, whole_step, whole_rows = generate_calls(tmp_path / "whole", generation_batch_size=2)
    assert default_calls == [1, 1]  # default: one generate call per micro-batch of batch_size rows
    assert whole_calls == [2]
    # the same prompts and groups reach the update, in the same update chunks (update_batch_size)
    assert whole_rows.rollout.prompts == default_rows.rollout.prompts
    assert torch.equal(whole_rows.group, default_rows.group)
    assert whole_step.grad_forward_rows == default_step.grad_forward_rows == [1, 1]
    with pytest.raises(Exception, match="generation_batch_size"):
        tiny_module(tiny_llama_dir, samples_per_prompt=2, generation_batch_size=3)
