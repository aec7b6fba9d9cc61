"""The LLM judge (``rlhf.feedback.judge``): random-initialised causal models of two families (Qwen2 with its chat template,
GPT-2 with the fallback one) judging through the real code paths. The mechanics are what is tested: each verdict
is the answer tokens' probability in the judge's own forward, comparisons are asked in both orders, and the judge
labels candidates and scores responses wherever a scorer goes."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ran
from families import BY_NAME, build

PROMPTS = [[{"role": "user", "content": "What is 2 + 3?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort these numbers: 3 1 2"}],
           [{"role": "user", "content": "Count the a's in banana"}]]
RESPONSES = ["The answer is 5.", "1 2 3, sorted from the smallest", "3"]


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    d = tmp_path_factory.mktemp("judges")
    return {name: build(BY_NAME[name], d / name, seed=3) for name in ("qwen2", "gpt2")}


def _by_hand(path, question: str, words: tuple[str, str]) -> float:
    """One question, unbatched: the chat template's generation prompt, the model's next-token logits, the two
    answer words' first tokens renormalised."""
    from transformers import AutoModelForCausalLM

    from rlhf.models import modeling
    from rlhf.config import ModelConfig

    tok = modeling.load_tokenizer(ModelConfig(base=str(path)))
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    first, second = (tok(w, add_special_tokens=False)["input_ids"][0] for w in words)
    return torch.softmax(logits[[first, second]], -1)[0].item()


@pytest.mark.fast
@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_a_grade_is_the_yes_probability_of_the_judge_s_own_forward(judges, name):
    from rlhf.feedback.judge import GRADE_TEMPLATE, GRADE_WORDS, Judge, conversation_text

    judge = Judge(str(judges[name]), device="cpu", batch_size=2)  # batches of 2: left padding is exercised
    grades = judge(PROMPTS, RESPONSES)
    expected = [_by_hand(judges[name], GRADE_TEMPLATE.format(conversation=conversation_text(p), response=r),
                         GRADE_WORDS) for p, r in zip(PROMPTS, RESPONSES)]
    assert grades == pytest.approx(expected, abs=1e-5)
    assert all(0 < g < 1 for g in grades) and len(set(grades)) == 3
    assert "system: Be brief.\nuser: Sort these numbers: 3 1 2" in GRADE_TEMPLATE.format(
        conversation=conversation_text(PROMPTS[1]), response="")


@pytest.mark.fast
def test_comparisons_are_asked_in_both_orders_and_averaged(judges):
    from rlhf.feedback.judge import COMPARE_TEMPLATE, COMPARE_WORDS, Judge, conversation_text

    judge = Judge(str(judges["qwen2"]), device="cpu")
    prompt, a, b = PROMPTS[0], "The answer is 5.", "5"
    ab, ba, aa = judge.prefer(prompt, [(a, b), (b, a), (a, a)])
    conv = conversation_text(prompt)
    first = _by_hand(judges["qwen2"], COMPARE_TEMPLATE.format(conversation=conv, a=a, b=b), COMPARE_WORDS)
    swapped = _by_hand(judges["qwen2"], COMPARE_TEMPLATE.format(conversation=conv, a=b, b=a), COMPARE_WORDS)
    assert ab == pytest.approx((first + 1 - swapped) / 2, abs=1e-5)
    assert abs(first - (1 - swapped)) > 1e-4  # the untrained judge does prefer a position: the average removes it
    assert ab + ba == pytest.approx(1.0, abs=1e-6) and aa == pytest.approx(0.5, abs=1e-6)
    ranks = judge.rank(prompt, [a, b, "six"])
    assert sum(ranks) == pytest.approx(1.5, abs=1e-6)  # 3 pairs, each probability shared out between two
    assert ranks[0] == pytest.approx((ab + judge.prefer(prompt, [(a, "six")])[0]) / 2, abs=1e-6)


@pytest.mark.fast
@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_the_judge_labels_candidates_through_the_cli(judges, name, tmp_path):
    from rlhf.feedback.judge import Judge

    candidates = tmp_path / "candidates.jsonl"
    rows = [{"prompt": p[-1]["content"], "responses": [r, r + " Indeed.", "I do not know."]}
            for p, r in zip(PROMPTS, RESPONSES)]
    candidates.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ran("label", str(candidates), "--by", f"judge:{judges[name]}", "--out", str(tmp_path / "rankings.jsonl"))
    ranked = [json.loads(x) for x in (tmp_path / "rankings.jsonl").read_text().splitlines()]
    judge = Judge(str(judges[name]), device="cpu")
    assert len(ranked) == 3
    for row in ranked:
        prompt = [{"role": "user", "content": row["prompt"]}]
        scores = judge.rank(prompt, row["responses"])
        assert row["label_scores"] == pytest.approx(scores, abs=1e-5)
        assert [sorted(set(scores), reverse=True).index(s) for s in scores] == row["ranking"]


@pytest.mark.fast
def test_a_judge_is_a_scorer_and_what_cannot_judge_is_refused(judges, tmp_path):
    from rlhf.feedback import scorers
    from rlhf.errors import UserError
    from rlhf.feedback.judge import Judge

    scorer = scorers.load(f"judge:{judges['gpt2']}", "eval.scorers")
    assert scorer.name == "judge" and scorer(PROMPTS, RESPONSES) == pytest.approx(
        Judge(str(judges["gpt2"]), device="cpu")(PROMPTS, RESPONSES), abs=1e-6)
    assert scorers.load(f"strict=judge:{judges['gpt2']}", "eval.scorers").name == "strict"
    with pytest.raises(UserError, match="judge:.*nowhere.*not found"):
        scorers.load(f"judge:{tmp_path / 'nowhere'}", "--by")
    with pytest.raises(UserError, match="names no model"):
        scorers.load("judge:", "--by")


@pytest.mark.fast
def test_a_question_longer_than_the_judge_is_none_and_counted_not_a_stopped_run(judges, tmp_path, capsys):
    """A response longer than the judge's positions: that grade is None ("cannot tell", counted), the others are
    judged as before; ranking a prompt with such a candidate leaves that prompt out of `rlhf label`, counted, and
    labels the rest (it stopped the run, naming neither the file nor the row)."""
    from rlhf.models import modeling
    from rlhf.feedback.judge import Judge

    judge = Judge(str(judges["gpt2"]), device="cpu")
    positions = modeling.max_positions(judge.model.config)
    huge = "word " * (2 * positions)
    grades = judge(PROMPTS, [RESPONSES[0], huge, RESPONSES[2]])
    assert grades[1] is None and grades[0] == pytest.approx(judge(PROMPTS[:1], RESPONSES[:1])[0], abs=1e-6)
    assert judge.too_long == 1 and "longer than its" in capsys.readouterr().err
    assert judge.rank(PROMPTS[0], ["a", huge, "b"]) == [None, None, None]

    candidates = tmp_path / "candidates.jsonl"
    rows = [{"prompt": p[-1]["content"], "responses": [r, r + " Indeed.", "I do not know."]}
            for p, r in zip(PROMPTS, RESPONSES)]
    rows[1]["responses"][2] = huge
    candidates.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = ran("label", str(candidates), "--by", f"judge:{judges['gpt2']}", "--out", str(tmp_path / "r.jsonl"))
    assert '"written": 2' in out and '"not_applicable": 1' in out
