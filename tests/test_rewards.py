"""Reward models through one interface (``rlhf.feedback.rewards``): published ones (small random-initialised
sequence-classification models of two families with other vocabularies than the tiny base's: Qwen2 with a chat
template and a pad token, GPT-2 with neither) used for eval, PPO and labelling, each score equal to the model's own
forward on the text as its authors' code would encode it; and this project's reward-model runs, whose every
spelling and use gives the scores of the run's own model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli, write_recipe
from families import BY_NAME, build

CONVERSATIONS = [([{"role": "user", "content": "What is 2 + 3?"}], "The answer is 5."),
                 ([{"role": "user", "content": "Sort these numbers: 3 1 2"}], "1 2 3, sorted from the smallest"),
                 ([{"role": "user", "content": "Count the a's in banana"}], "3")]


def _reward_model(name: str, out: Path, num_labels: int = 1) -> Path:
    from transformers import AutoModelForSequenceClassification

    base = build(BY_NAME[name], out.parent / f"{out.name}-base")
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    torch.nn.init.normal_(model.score.weight, std=0.5)  # a head that tells responses apart
    model.save_pretrained(out)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    d = tmp_path_factory.mktemp("published")
    return {"qwen2": _reward_model("qwen2", d / "qwen2-rm"), "gpt2": _reward_model("gpt2", d / "gpt2-rm")}


def _authors_score(path: Path, prompt, response) -> float:
    """What the model's own code gives for one conversation: the chat template applied by the tokenizer (or the
    prompt and response as a text pair without one), then the forward's pooled logit, one sequence at a time."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    if tok.chat_template:
        enc = tok.apply_chat_template([*prompt, {"role": "assistant", "content": response}], return_tensors="pt",
                                      return_dict=True)
    else:
        enc = tok(prompt[-1]["content"], response, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0, 0].item()


@pytest.mark.fast
@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_scores_equal_the_models_own_forward(published, name):
    from rlhf.feedback.rewards import PublishedReward

    rm = PublishedReward(str(published[name]), device="cpu", batch_size=8)
    assert rm.pad_token_id == (None if name == "gpt2" else rm.tokenizer.pad_token_id)  # gpt2: one at a time
    scores = rm([p for p, _ in CONVERSATIONS], [r for _, r in CONVERSATIONS])
    expected = [_authors_score(published[name], p, r) for p, r in CONVERSATIONS]
    assert scores == pytest.approx(expected, abs=1e-5) and len(set(scores)) == 3
    assert rm.identity["id"] == str(published[name]) and len(rm.identity["directory_sha256"]) == 64


@pytest.mark.fast
@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_a_conversation_longer_than_a_published_model_keeps_its_response(published, name, capsys):
    """Past the model's positions the conversation is cut from the left: the response, which is scored, stays,
    and the score is the model's own forward on the kept tail (behind the leading special token, if any). It was
    cut from the right: the response went and the prompt was scored, silently. Counted and said."""
    from rlhf.feedback.rewards import PublishedReward

    rm = PublishedReward(str(published[name]), device="cpu")
    long_prompt = [{"role": "user", "content": "Tell me about this: " + "blah " * (2 * rm.positions)}]
    a, b = rm([long_prompt, long_prompt], ["The answer is 5.", "I do not know at all, sorry."])
    assert a != b and rm.truncated == 2 and "cut from the left" in capsys.readouterr().err
    ids = rm.encode(long_prompt, "The answer is 5.")
    assert len(ids) == rm.positions and "The answer is 5." in rm.tokenizer.decode(ids[-16:])
    with torch.no_grad():
        own = rm.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert a == pytest.approx(own, abs=1e-5)


@pytest.mark.fast
def test_what_is_not_a_reward_model_is_refused(published, tmp_path):
    from rlhf.errors import UserError
    from rlhf.feedback.rewards import check

    causal = build(BY_NAME["qwen2"], tmp_path / "causal")
    with pytest.raises(UserError, match="is a causal language model, not a reward model"):
        check(str(causal))
    two = _reward_model("gpt2", tmp_path / "two-labels", num_labels=2)
    with pytest.raises(UserError, match="has 2 outputs; a reward model has one"):
        check(str(two))
    with pytest.raises(UserError, match="neither a run directory .* nor a model directory"):
        check(str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        check(str(tmp_path / "nowhere" / "rm"))
    recipe = write_recipe(tmp_path / "r.yaml", run_dir=str(tmp_path / "runs"))  # the base's ICL row alone
    proc = run_cli("eval", "--recipe", str(recipe), "--set", "eval.policies=[]", "--reward", str(causal), "--out",
                   str(tmp_path / "eval"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "is a causal language model" in proc.stderr


def test_eval_ppo_and_labelling_with_a_published_reward_model(published, parents, tmp_path):
    from rlhf.feedback.rewards import PublishedReward

    recipe, runs = parents
    rm_dir = str(published["qwen2"])
    rm = PublishedReward(rm_dir, device="cpu")

    # eval: each response's reward is the published model's score of the text
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + 2?"}) + "\n" for i in range(4)))
    run_cli("eval", "--recipe", str(recipe), "--policy", "sft", "--reward", rm_dir, "--prompts", str(prompts),
            "--icl-shots", "0", "--out", str(tmp_path / "eval"))
    records = [json.loads(x) for x in (tmp_path / "eval" / "responses.jsonl").read_text().splitlines()]
    rescored = rm([[{"role": "user", "content": r["prompt"]}] for r in records], [r["response"] for r in records])
    assert [r["reward"] for r in records] == pytest.approx(rescored, abs=1e-4)
    manifest = json.loads((tmp_path / "eval" / "manifest.json").read_text())
    assert manifest["reward_model"]["id"] == rm_dir and manifest["parents"]["rm"] is None

    # PPO: the published model is a separate frozen model; normalised by statistics of the first step's samples
    out = tmp_path / "ppo"
    sets = ["ppo.max_steps=2", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.micro_batch_size=2",
            "ppo.max_new_tokens=12", "ppo.eval_every=0"]
    run_cli("ppo", "--recipe", str(recipe), "--reward", rm_dir, "--out", str(out),
            *[x for kv in sets for x in ("--set", kv)])
    m = json.loads((out / "manifest.json").read_text())
    assert m["reward"]["reward_model"]["id"] == rm_dir and m["parents"]["rm"] is None
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "objective/score" in r)
    assert m["reward_stats"]["mean"] == pytest.approx(first["objective/score"], abs=1e-5)
    assert m["reward_stats"]["std"] > 0 and math.isfinite(m["metrics"]["objective/score"])
    assert f"reward model (published, not a run): `{rm_dir}`" in (out / "README.md").read_text()

    # labelling: candidates ranked by the published model's scores
    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text("".join(json.dumps({"prompt": p[0]["content"], "responses": [r, r + " Indeed."]}) + "\n"
                                  for p, r in CONVERSATIONS))
    run_cli("label", str(candidates), "--by", f"rm:{rm_dir}", "--out", str(tmp_path / "rankings.jsonl"))
    ranked = [json.loads(x) for x in (tmp_path / "rankings.jsonl").read_text().splitlines()]
    for row in ranked:
        prompt = [{"role": "user", "content": row["prompt"]}]
        assert row["label_scores"] == pytest.approx(rm([prompt, prompt], row["responses"]), abs=1e-4)


def test_every_spelling_and_form_of_a_run_scores_as_the_run_s_own_model(parents):
    """A reward-model run read by ``rewards.load`` (as eval's ``--reward``), as a scorer (``rm:RUN`` or the bare
    directory, as ``rlhf label --by``) and in PPO's token form gives the scores of the run's own model and its
    stored statistics; a response longer than the run's rm.max_length gets None (it never learnt to read one)."""
    from rlhf.feedback import rewards, scorers
    from rlhf.models import heads
    from rlhf.models import modeling
    from rlhf.text import encoding

    _, runs = parents
    prompts, responses = [p for p, _ in CONVERSATIONS], [r for _, r in CONVERSATIONS]
    model, tok = modeling.load_reward(runs / "rm", device="cpu")
    expected = rewards.score_conversations(
        model, tok, [[*p, {"role": "assistant", "content": r}] for p, r in CONVERSATIONS]).tolist()
    direct = rewards.load(runs / "rm", device="cpu")
    assert isinstance(direct, rewards.RunReward) and direct.identity is None
    assert direct.stats == json.loads((runs / "rm" / "manifest.json").read_text())["reward_stats"]
    assert direct(prompts, responses) == pytest.approx(expected, abs=1e-5)
    for spec in (f"rm:{runs / 'rm'}", str(runs / "rm")):
        scorer = scorers.load(spec, "--by")
        assert scorer.name == "rm" and scorer(prompts, responses) == pytest.approx(expected, abs=1e-5)
    limit = direct.max_length
    assert limit == json.loads((runs / "rm" / "manifest.json").read_text())["recipe"]["rm"]["max_length"]
    scored = direct(prompts + prompts[:1], responses + [" ".join(["seven"] * limit)])
    assert scored[-1] is None and scored[:3] == pytest.approx(expected, abs=1e-5)
    token = rewards.TokenReward(lambda ids, mask: heads.sequence_scores(model, ids, mask), tok, runs / "rm",
                                direct.stats, torch.device("cpu"))
    assert token(prompts, responses) == pytest.approx(expected, abs=1e-5)
    ids, mask = encoding.pad(encoding.encode_conversations(
        tok, [[*p, {"role": "assistant", "content": r}] for p, r in CONVERSATIONS]), tok.pad_token_id)
    assert token.episodes(prompts, responses, ids, mask).tolist() == pytest.approx(expected, abs=1e-5)


@pytest.mark.fast
def test_a_published_model_s_statistics_are_measured_once_and_kept(published):
    from rlhf.feedback.rewards import PublishedReward

    rm = PublishedReward(str(published["gpt2"]), device="cpu")
    assert rm.stats is None
    first = rm.measure(torch.tensor([1.0, 3.0]), "step 1")
    assert first == {"mean": 2.0, "std": 1.0, "measured_on": "step 1"}
    assert rm.measure(torch.tensor([10.0, 10.0]), "step 2") is first  # kept for the run
    constant = PublishedReward(str(published["gpt2"]), device="cpu")
    assert constant.measure(torch.tensor([4.0, 4.0]), "step 1")["std"] == 1.0  # no spread: std 1, not 0
