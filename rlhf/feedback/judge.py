"""An LLM judge (AI feedback): a causal chat model asked to grade or compare responses, its verdict read from the
probabilities of the answer tokens, never from generated text.

``judge:MODEL`` names one wherever a scorer goes (``eval.scorers``, ``ppo.reward``, ``rlhf label --by``): MODEL is
a model directory or hub id of a causal language model, or a policy run of this project (SFT, PPO, DPO). The
question is one user turn rendered with the judge's own chat template (generation prompt added, the template
fitted as every stage fits one, ``modeling.fit_tokenizer``), and the verdict is the next-token distribution over
the two answer words' first tokens, renormalised over the two: a number in [0, 1], with no parsing to go wrong.

Grading one response (a scorer: ``judge(prompts, responses) -> [p(Yes)]``)::

    GRADE_TEMPLATE, answered with "Yes" or "No";  score = p(Yes) / (p(Yes) + p(No))

Comparing two (``rlhf label --by judge:MODEL`` ranks each prompt's candidates this way)::

    COMPARE_TEMPLATE, answered with "A" or "B"

A judge prefers a position (Zheng et al. 2023, "Judging LLM-as-a-judge", sec. 3.3: GPT-4 kept its verdict when
the two answers swapped places in 65% of cases), so every pair is asked in both orders and the verdicts averaged:
``P(a > b) = (p_A(a, b) + p_B(b, a)) / 2``, which makes ``P(a > b) + P(b > a) = 1`` exactly and a response
against itself 0.5. A candidate's score is its mean probability of beating each of the others (K(K - 1) forward
passes for K candidates).
"""

from __future__ import annotations

import sys

import torch

from rlhf.errors import UserError

GRADE_TEMPLATE = (
    "You are judging an assistant's answer.\n\n"
    "Conversation:\n{conversation}\n\n"
    "Answer:\n{response}\n\n"
    "Is the answer correct, helpful and to the point? Reply with Yes or No."
)
COMPARE_TEMPLATE = (
    "You are judging two assistant answers to the same conversation.\n\n"
    "Conversation:\n{conversation}\n\n"
    "Answer A:\n{a}\n\n"
    "Answer B:\n{b}\n\n"
    "Which answer is better: more correct, more helpful and more to the point? Reply with A or B."
)
GRADE_WORDS = ("Yes", "No")
COMPARE_WORDS = ("A", "B")


def conversation_text(prompt: list[dict]) -> str:
    """The prompt's messages as the judge reads them: one ``role: content`` paragraph each."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


class Judge:
    """A judge model on this process's accelerator, frozen, in eval mode (module docstring)."""

    def __init__(self, spec: str, device: torch.device | str | None = None, batch_size: int = 8):
        from rlhf.models import modeling
        from rlhf.config import ModelConfig

        if not spec:
            raise UserError("judge: names no model (judge:MODEL_DIR, judge:HUB_ID or judge:RUN_DIR)")
        self.spec, self.batch_size = spec, batch_size
        found = modeling.find(spec, what="a judge", prefix="judge:")
        if isinstance(found, modeling.ParentRun):
            if found.stage == "rm":
                raise UserError(f"judge:{spec} is a reward-model run; a judge is a chat model (use rm:{spec})")
            self.model, self.tokenizer = modeling.load_policy(found.dir, device=device)
        else:
            cfg = ModelConfig(base=spec)
            self.tokenizer = modeling.load_tokenizer(cfg)
            self.model = modeling.load_base(cfg, device=device or modeling.accelerator()).eval()
        self.model.requires_grad_(False)
        self.too_long = 0
        """questions longer than the judge's positions, each scored None ("cannot tell") rather than cut"""
        self._long_calls = 0
        self.grade_ids = self._answer_ids(GRADE_WORDS)
        self.compare_ids = self._answer_ids(COMPARE_WORDS)

    def _answer_ids(self, words: tuple[str, str]) -> tuple[int, int]:
        """The first token of each answer word, as the judge would start its reply."""
        ids = tuple(self.tokenizer(w, add_special_tokens=False)["input_ids"][:1] for w in words)
        if not all(ids) or ids[0] == ids[1]:
            raise UserError(f"judge:{self.spec}: its tokenizer cannot tell {words[0]!r} from {words[1]!r} by their "
                            "first token, so no verdict can be read")
        return ids[0][0], ids[1][0]

    def encode(self, question: str) -> list[int]:
        """One question as a user turn, with the generation prompt: where the judge's reply starts."""
        from rlhf.text import encoding

        return encoding.encode_prompt(self.tokenizer, [{"role": "user", "content": question}])

    @torch.no_grad()
    def first_of_two(self, questions: list[str], answer_ids: tuple[int, int]) -> list[float | None]:
        """Each question's probability of the first answer against the second: ``sigmoid(l_first - l_second)``
        of the reply's first-token logits (batched, left-padded, positions counted over real tokens). A question
        longer than the judge's positions is None, "cannot tell": cut from either end it would lose the
        conversation's start or the answers being judged, and a verdict on what the judge did not read is no
        verdict. Counted in ``too_long`` and said on stderr (the first call that had one, and every tenth after:
        PPO calls a judge every step)."""
        from rlhf.models import methods, modeling
        from rlhf.text import encoding

        sequences = [self.encode(q) for q in questions]
        limit = modeling.max_positions(methods.unwrap(self.model).config)
        over = [i for i, s in enumerate(sequences) if limit is not None and len(s) > limit]
        if over:
            self.too_long += len(over)
            self._long_calls += 1
        if over and self._long_calls % 10 == 1:
            print(f"judge:{self.spec}: {len(over)} of {len(sequences)} questions are longer than its {limit} "
                  f"positions (the longest {max(len(sequences[i]) for i in over)} tokens): scored None, not judged "
                  f"({self.too_long} so far)", file=sys.stderr)
        device = next(self.model.parameters()).device
        first, second = answer_ids

        def forward(ids, mask):  # left-padded: every question's reply starts at the last column
            ids, mask = ids.to(device), mask.to(device)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=encoding.position_ids(mask),
                                use_cache=False).logits[:, -1].float()
            return torch.sigmoid(logits[:, first] - logits[:, second])

        fitting = [i for i in range(len(sequences)) if i not in set(over)]
        judged = encoding.by_length([sequences[i] for i in fitting], forward, self.batch_size,
                                    self.tokenizer.pad_token_id, side="left")
        out: list[float | None] = [None] * len(sequences)
        for i, p in zip(fitting, judged):
            out[i] = p
        return out

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> list[float | None]:
        """Grades: each response's probability of "Yes" (None: too long to judge)."""
        return self.first_of_two([GRADE_TEMPLATE.format(conversation=conversation_text(p), response=r)
                                  for p, r in zip(prompts, responses)], self.grade_ids)

    def prefer(self, prompt: list[dict], pairs: list[tuple[str, str]]) -> list[float | None]:
        """``P(a > b)`` of each pair, asked in both orders and averaged (None when either order is too long)."""
        conv = conversation_text(prompt)
        asked = [COMPARE_TEMPLATE.format(conversation=conv, a=a, b=b) for a, b in pairs]
        swapped = [COMPARE_TEMPLATE.format(conversation=conv, a=b, b=a) for a, b in pairs]
        p = self.first_of_two(asked + swapped, self.compare_ids)
        n = len(pairs)
        return [None if p[i] is None or p[n + i] is None else (p[i] + 1.0 - p[n + i]) / 2 for i in range(n)]

    def rank(self, prompt: list[dict], responses: list[str]) -> list[float | None]:
        """Each candidate's mean probability of beating each other candidate (every pair asked once per order);
        every candidate None when a comparison was too long to judge (``rlhf label`` leaves the prompt out and
        counts it)."""
        k = len(responses)
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        p = self.prefer(prompt, [(responses[i], responses[j]) for i, j in pairs])
        if any(v is None for v in p):
            return [None] * k
        wins = [0.0] * k
        for (i, j), v in zip(pairs, p):
            wins[i] += v
            wins[j] += 1.0 - v
        return [w / max(k - 1, 1) for w in wins]
