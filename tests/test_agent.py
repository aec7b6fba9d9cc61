"""Multi-turn episodes (``rlhf.engine.agent``): the mask covers exactly the sampled tokens, sampled ids are never
encoded again, tool results are the template's own ids, episodes of a batch end at different turns and for the
reasons counted, and the engine's log-probs are the training forward's on the concatenated ids."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.fast

CALL = '<tool_call>{"name": "add", "arguments": {"a": 37, "b": 48}}</tool_call>'


def _tiny():
    from rlhf.config import ModelConfig
    from rlhf.models import modeling

    return modeling.load_tokenizer(ModelConfig(base="data/tiny-base"))


class Scripted:
    """A sampler that answers each episode (by its key) with the next turn of its script, and records what the
    engine was given: each turn's query and offsets."""

    def __init__(self, tok, scripts: dict[int, list[list[int]]]):
        self.tok, self.scripts, self.seen = tok, scripts, []

    def __call__(self, query, mask, keys, offsets, max_new_tokens):
        from rlhf.engine.rollout import Samples

        self.seen.append((query, mask, keys.tolist(), offsets.tolist()))
        turns = [self.scripts[k].pop(0)[:max_new_tokens] for k in keys.tolist()]
        width = max(len(t) for t in turns)
        tokens = torch.full((len(turns), width), self.tok.pad_token_id)
        logp = torch.zeros(len(turns), width)
        for i, t in enumerate(turns):
            tokens[i, :len(t)] = torch.tensor(t)
            logp[i, :len(t)] = -0.1 * torch.arange(1, len(t) + 1)  # a recognisable value per position
        return Samples(tokens, logp, -logp)


def _ids(tok, text: str, eos: bool = True) -> list[int]:
    return tok.encode(text, add_special_tokens=False) + ([tok.eos_token_id] if eos else [])


def test_episodes_end_at_their_own_turns_and_the_mask_covers_exactly_what_was_sampled():
    from rlhf.engine import agent, environments

    tok = _tiny()
    env = environments.load("tiny:calculator")
    schemas = list(env.schemas)
    letters = sum((tok.encode(c, add_special_tokens=False) for c in "The answer is 85."), [])  # one token a character
    assert tok.encode(tok.decode(letters), add_special_tokens=False) != letters  # the sampler's split: kept as is
    scripts = {
        0: [_ids(tok, CALL), letters + [tok.eos_token_id]],                       # call, then answer
        1: [_ids(tok, "The answer is 12.")],                                      # answers at once
        2: [_ids(tok, "<tool_call>{'name': 'add'}</tool_call>"), _ids(tok, CALL), _ids(tok, "The answer is 85.")],
        3: [_ids(tok, "The answer is", eos=False) * 30],                           # never ends: cut
        4: [_ids(tok, CALL)] * 5,                                                  # calls forever
    }
    sampler = Scripted(tok, {k: [list(t) for t in v] for k, v in scripts.items()})
    prompts = [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(5)]
    limits = environments.Limits(max_turns=3, max_tokens=400)
    episodes = agent.roll_out(sampler, tok, prompts, env, [{}] * 5, torch.arange(5), limits, max_new_tokens=80)

    assert [ep.ended for ep in episodes] == ["answered", "answered", "answered", "cut", "max_turns"]
    assert [ep.turns for ep in episodes] == [2, 1, 3, 1, 3]
    assert [ep.calls for ep in episodes] == [1, 0, 2, 0, 2]
    assert [ep.instance.calls for ep in episodes] == [1, 0, 1, 0, 2]
    assert episodes[2].failures == {"malformed": 1} and not episodes[0].failures
    assert [len(s[2]) for s in sampler.seen] == [5, 3, 2]  # each turn samples only the episodes still going

    first = episodes[0]
    result = environments.continuation_ids(tok, [{"role": "tool", "name": "add", "content": "85"}], schemas)
    assert first.response == scripts[0][0] + result + letters + [tok.eos_token_id]  # the sampled ids as sampled
    assert first.sampled == [1] * len(scripts[0][0]) + [0] * len(result) + [1] * (len(letters) + 1)
    assert all(lp == 0.0 for lp, s in zip(first.logp, first.sampled) if not s)
    assert first.logp[-1] == pytest.approx(-0.1 * (len(letters) + 1))  # the second turn's own log-probs
    # the second turn read the prompt, the first turn and the result as ids, and drew its noise past them
    query, mask, keys, offsets = sampler.seen[1]
    row = keys.index(0)
    assert first.prompt == tok.apply_chat_template(prompts[0], tools=schemas, add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)
    assert query[row][mask[row].bool()].tolist() == first.prompt + scripts[0][0] + result
    assert offsets[row] == len(scripts[0][0]) + len(result)
    assert tok.decode(result) == "<|user|><tool_response>85</tool_response><|end|><|assistant|>"
    assert first.messages[1] == {"role": "tool", "name": "add", "content": "85"}
    assert first.messages[0]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 37, "b": 48}}
    # the whole conversation as the template renders it is the episode's ids: nothing was re-rendered
    whole = tok.apply_chat_template([{"role": "user", "content": "What is 0 + 1?"}] + first.messages[:2],
                                    tools=schemas, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert first.prompt + first.response[:len(scripts[0][0]) + len(result)] == whole
    assert episodes[3].response == scripts[3][0][:80] and episodes[3].sampled == [1] * 80


def test_the_token_limit_ends_an_episode_before_the_environment_overflows_it():
    from rlhf.engine import agent, environments

    tok = _tiny()
    env = environments.load("tiny:calculator")
    sampler = Scripted(tok, {0: [_ids(tok, CALL), _ids(tok, "The answer is 85.")]})
    prompt = [{"role": "user", "content": "What is 37 + 48?"}]
    ep, = agent.roll_out(sampler, tok, [prompt], env, [{}], torch.tensor([0]),
                         environments.Limits(max_tokens=len(_ids(tok, CALL)) + 3), max_new_tokens=100)
    assert ep.ended == "max_tokens" and ep.turns == 1 and ep.sampled == [1] * len(_ids(tok, CALL))


def test_a_template_without_a_tool_format_is_refused():
    from families import BY_NAME, make_tokenizer

    from rlhf.engine import agent, environments

    from rlhf.errors import UserError

    tok = make_tokenizer(BY_NAME["llama3"])
    with pytest.raises(UserError, match="writes no tool calls"):
        agent.roll_out(None, tok, [[1]], environments.load("tiny:calculator"), [{}], torch.tensor([0]),
                       environments.Limits(), 8)


def test_the_engines_log_probs_are_the_training_forwards_on_the_concatenated_ids():
    """fp32, the tiny base (its EOS made likelier by a hook on its head, so that turns end), every turn a call
    until the third: the log-prob and entropy the engine kept for each sampled token equal a plain forward over
    prompt + response (environment tokens included as context), so PPO's first ratio is 1."""
    from rlhf.config import ModelConfig
    from rlhf.engine import agent, environments, rollout
    from rlhf.models import modeling
    from rlhf.ppo import ppo_math

    cfg = ModelConfig(base="data/tiny-base")
    tok, model = modeling.load_tokenizer(cfg), modeling.load_base(cfg).eval()
    boost = torch.zeros(model.config.vocab_size)
    boost[tok.eos_token_id] = 4.0
    model.lm_head.register_forward_hook(lambda module, inputs, out: out + boost)
    env = environments.load("tiny:calculator")
    call = environments.parse_calls(CALL, "hermes")

    def parse(text):  # every turn but the third calls the calculator, whatever it says
        parse.turns += 1
        return call if parse.turns % 3 else environments.Parsed()
    parse.turns = 0

    def sample(query, mask, **kwargs):
        return rollout.decode(model, query, mask, temperature=1.0, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, vocab=len(tok), **kwargs)

    prompts = [[{"role": "user", "content": q}] for q in ("What is 3 + 4?", "Sort these numbers: 5 1 3")]
    episodes = agent.roll_out(sample, tok, prompts, env, [{}, {}], torch.tensor([11, 12]),
                              environments.Limits(max_turns=4, max_tokens=160), 24, parse=parse)
    assert any(0 in ep.sampled for ep in episodes)  # environment tokens lie between sampled ones
    for ep in episodes:
        ids = torch.tensor([ep.prompt + ep.response])
        with torch.no_grad():
            logits = ppo_math.predicting(ppo_math.restrict_vocab(model(input_ids=ids).logits, len(tok)),
                                         len(ep.response))
        logp = ppo_math.logprobs_from_logits(logits, torch.tensor([ep.response]))[0]
        entropy = ppo_math.entropy_from_logits(logits)[0]
        sampled = torch.tensor(ep.sampled, dtype=torch.bool)
        torch.testing.assert_close(logp[sampled], torch.tensor(ep.logp)[sampled], atol=2e-5, rtol=0)
        torch.testing.assert_close(entropy[sampled], torch.tensor(ep.entropy)[sampled], atol=2e-5, rtol=0)


def test_environment_tokens_get_no_gradient_no_kl_and_no_advantage():
    """A batch of scripted episodes as PPO trains on it (``to_episodes``): the policy loss with an entropy bonus
    and the KL as a loss term gives the logits at the environment's positions exactly zero gradient; the KL in the
    reward is zero there; GAE's advantages are zero there and equal GAE over the sampled tokens alone."""
    from rlhf.config import PPOConfig
    from rlhf.engine import agent, environments
    from rlhf.ppo import ppo_math
    from rlhf.ppo.ppo_update import Batch, policy_objective

    tok = _tiny()
    env = environments.load("tiny:calculator")
    sampler = Scripted(tok, {0: [_ids(tok, CALL), _ids(tok, "The answer is 85.")],
                             1: [_ids(tok, "The answer is 2.")]})
    played = agent.roll_out(sampler, tok, [[{"role": "user", "content": "What is 37 + 48?"}],
                                           [{"role": "user", "content": "What is 1 + 1?"}]], env, [{}, {}],
                            torch.tensor([0, 1]), environments.Limits(), 100)
    episodes = agent.to_episodes(played, tok.pad_token_id, "cpu")
    sampled, real = episodes.sampled.bool(), episodes.response_mask.bool()
    assert (real & ~sampled).any() and (sampled <= real).all()  # environment tokens inside the response
    assert episodes.turns.answers == ["The answer is 85.", "The answer is 2."]
    assert episodes.turns.calls.tolist() == [1, 0] and episodes.turns.ended == ["answered", "answered"]
    B, L = episodes.response.shape
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, L, 64, generator=g).requires_grad_()
    response = episodes.response.clamp(max=63)
    old = ppo_math.logprobs_from_logits(logits.detach(), response)
    ref = old + 0.1 * torch.randn(B, L, generator=g)
    rewards, kl = ppo_math.kl_penalized_rewards(torch.tensor([1.0, 0.0]), old, ref, episodes.sampled, 0.1)
    assert (kl[~sampled] == 0).all() and (rewards[~sampled] == 0).all() and (kl[sampled] != 0).any()
    values = torch.randn(B, L, generator=g)
    advantages, returns = ppo_math.gae(rewards, values, episodes.sampled, 1.0, 0.95)
    assert (advantages[~sampled] == 0).all()
    alone, _ = ppo_math.gae(rewards[0][sampled[0]][None], values[0][sampled[0]][None], torch.ones(1, sampled[0].sum()))
    torch.testing.assert_close(advantages[0][sampled[0]], alone[0])
    batch = Batch(episodes=dataclasses.replace(episodes, response=response, logp=old), ref_logp=ref, values=values,
                  rewards=rewards, kl=kl, advantages=advantages, returns=returns)
    p = PPOConfig(kl_in="loss", kl_estimator="k3", entropy_coef=0.01)
    loss, _, _ = policy_objective(logits, batch, torch.arange(B), p, 0.1, torch.tensor(1.0), torch.tensor(1.0))
    loss.backward()
    assert logits.grad[~sampled].abs().max() == 0 and logits.grad[sampled].abs().sum() > 0


def test_refilled_rows_carry_their_turns():
    """Dynamic sampling's refills (``replace_rows``) replace multi-turn rows whole: tokens, the sampled mask (0 on
    the padding the wider batch adds) and what the episodes did."""
    from rlhf.engine import agent, environments
    from rlhf.engine.episodes import Scored, replace_rows

    tok = _tiny()
    env = environments.load("tiny:calculator")

    def batch(scripts, keys):
        played = agent.roll_out(Scripted(tok, scripts), tok, [[{"role": "user", "content": "What is 37 + 48?"}]]
                                * len(keys), env, [{}] * len(keys), torch.tensor(keys), environments.Limits(), 100)
        episodes = agent.to_episodes(played, tok.pad_token_id, "cpu")
        zeros = torch.zeros(len(keys))
        return Scored(episodes=episodes, scores=None, terms={}, overlong=None, total=zeros, shaped=zeros)

    old = batch({0: [_ids(tok, "The answer is 1.")], 1: [_ids(tok, "The answer is 2.")]}, [0, 1])
    new = batch({5: [_ids(tok, CALL), _ids(tok, "The answer is 85.")]}, [5])
    merged = replace_rows(old, torch.tensor([1]), new, tok.pad_token_id).episodes
    assert merged.turns.answers == ["The answer is 1.", "The answer is 85."]
    assert merged.turns.calls.tolist() == [0, 1] and merged.turns.turns.tolist() == [1, 2]
    assert merged.sampled[1].tolist() == new.episodes.sampled[0].tolist()
    assert merged.sampled[0].sum() == old.episodes.sampled[0].sum() and merged.sampled.shape == merged.response.shape
    assert merged.turns.instances[1] is new.episodes.turns.instances[0]


def test_an_episode_as_data_renders_to_the_ids_ppo_played():
    """``rlhf sample --env`` stores an episode as messages; the reward model trains on them rendered with the tools
    (``encode_exchange``), and PPO's reward adapter reads the played ids: with sampled ids the tokenizer's own, the
    two are the same sequence, so a reward model trained on labelled episodes is read where it was trained. A turn
    with a malformed call keeps its text as sampled."""
    from rlhf.engine import agent, environments
    from rlhf.text import encoding, formats

    tok = _tiny()
    env = environments.load("tiny:calculator")
    broken = "<tool_call>{'name': 'add'}</tool_call>"
    scripts = {0: [_ids(tok, CALL), _ids(tok, "The answer is 85.")],
               1: [_ids(tok, broken), _ids(tok, "I am not sure, but maybe 9.")]}
    prompts = [[{"role": "user", "content": "What is 37 + 48?"}], [{"role": "user", "content": "What is 4 + 5?"}]]
    played = agent.roll_out(Scripted(tok, scripts), tok, prompts, env, [{}, {}], torch.arange(2),
                            environments.Limits(max_turns=3, max_tokens=400), max_new_tokens=80)
    assert played[1].messages[0] == {"role": "assistant", "content": broken}
    assert played[1].failures == {"malformed": 1}
    for prompt, ep in zip(prompts, played):
        response = formats._response(ep.messages, "responses[0]")  # as the ranking formats read it back
        assert response == ep.messages
        prompt_ids, response_ids = encoding.encode_exchange(tok, prompt, response, list(env.schemas))
        assert prompt_ids + response_ids == ep.prompt + ep.response
    assert formats.duplicates([played[0].messages, played[1].messages, played[0].messages]) == [None, None, 0]
    assert formats.answer(played[0].messages) == "The answer is 85."
