"""Rewards: one way to read a reward model, whatever it is and wherever it is used.

A reward model is a scorer (``rlhf/feedback/scorers.py``) with normalisation statistics:

    rm(prompts, responses) -> list[float | None]      # prompts as message lists, responses as text
    rm.stats                                           # {"mean", "std", ...} or None until measured
    rm.episodes(prompts, responses, ids, mask)         # PPO's episodes: a tensor of scores

``load(spec)`` reads every spelling: a reward-model run directory of this project, a model directory or hub id of
a published sequence-classification reward model, and any of those after ``rm:`` (the scorer spelling). eval's
reward column, ``rlhf label --by``, ``rm:`` scorers and PPO all take what it returns.

- ``RunReward``: a run of this project (base + adapter + score head, or a full model), its tokenizer and chat
  template, the statistics its RM stage measured on its training responses (``manifest.json``), and its length
  limit: a conversation longer than its ``rm.max_length`` gets None (it never learnt to read one).
- ``PublishedReward``: any Hugging Face sequence-classification model with one output. It brings its own
  tokenizer, chat template and dtype; each conversation is rendered with ITS chat template (the whole
  conversation, as reward-model leaderboards score), tokenised with its tokenizer, and scored by the model's own
  forward, which pools where its authors' code pools (its ``config.pad_token_id`` convention: batches are
  right-padded with that id, or scored one at a time when the model has none, as transformers requires). A
  tokenizer without a chat template gets the prompt and the response as a text pair (the convention of encoder
  reward models such as OpenAssistant's DeBERTa ones). The policy's tokens are never fed to it: text goes in. It
  has no statistics until ``measure`` sets them (PPO: from its first step's samples).
- ``TokenReward``: PPO's fast path. The reward adapter on the policy's own base reads the episodes' token ids as
  they are (no decoding, no second tokenizer); as a scorer it encodes text with the policy's tokenizer.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Callable

import torch

from rlhf.models import heads, modeling
from rlhf.text.encoding import by_length, encode_conversations, pad, with_responses
from rlhf.errors import UserError
from rlhf.models.methods import unwrap
from rlhf.models.modeling import max_positions
from rlhf.names import is_local, torch_dtype


@torch.no_grad()
def score_sequences(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 32,
                    progress: bool = False) -> torch.Tensor:
    """Reward-model scores of token sequences, ``[n]``, read at ``heads.reward_index``. A sequence longer than
    the model's positions is an error (callers drop rows by the recipe's lengths first)."""
    limit = max_positions(unwrap(model).config)
    longest = max((len(s) for s in sequences), default=0)
    if limit is not None and longest > limit:
        raise UserError(f"a sequence of {longest} tokens is longer than the reward model's {limit} positions")
    device = next(model.parameters()).device
    scores = by_length(sequences, lambda ids, mask: heads.sequence_scores(model, ids.to(device), mask.to(device))
                       .float().cpu(), batch_size, pad_token_id, progress="score" if progress else None)
    return torch.tensor(scores, dtype=torch.float32)


def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 32,
                        progress: bool = False) -> torch.Tensor:
    """Reward-model scores of whole conversations (each ending with the response), ``[n]``.

    Text goes in, so a policy with another tokenizer can be scored: each conversation is encoded with the reward
    model's tokenizer exactly as its training pairs were (``encode_conversations``).
    """
    return score_sequences(model, encode_conversations(tokenizer, conversations), tokenizer.pad_token_id,
                           batch_size, progress)


# ---------------------------------------------------------------------------------------------------------------
# Reward models
# ---------------------------------------------------------------------------------------------------------------

class RewardModel:
    """What every reward model offers (module docstring)."""

    run: modeling.ParentRun | None = None
    """the reward-model run of ours it is (its adapter can sit on the policy's base); None for a published model"""
    reads_ids = False
    """whether it scores PPO's episodes by their token ids (the reward adapter on the policy's base) rather than
    by their decoded text"""

    identity: dict | None = None
    """a published model's id, revision and directory hash (manifests and lineage); None for a run of this
    project (recorded as a parent run instead)"""
    stats: dict | None = None
    run_dir: Path | None = None
    tokenizer = None
    config = None
    """the model's transformers config (its positions)"""

    def __call__(self, prompts: list[list[dict]], responses: list[str | list[dict]],
                 tools: list[dict] | None = None) -> list[float | None]:
        """Scores of texts, or of episodes (lists of messages after the prompt) played with ``tools``."""
        raise NotImplementedError

    def episodes(self, prompts: list[list[dict]], responses: list[str], ids: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        """PPO's episodes scored, ``[n]`` on ``ids``' device: the text path (``TokenReward`` reads ``ids``)."""
        values = self(prompts, responses)
        missing = next((i for i, v in enumerate(values) if v is None), None)
        if missing is not None:
            raise UserError(f"the reward model does not score episode {missing + 1}: longer than any conversation "
                            "it was trained on (lower ppo.max_new_tokens, or train it with a longer rm.max_length)")
        return torch.tensor(values, dtype=torch.float32, device=ids.device)

    def measure(self, scores: torch.Tensor, measured_on: str) -> dict:
        """The statistics, measured once: mean and std of ``scores`` over every process's samples (a published
        model has no manifest to read them from); a constant score gets std 1. Kept once set."""
        from rlhf.scale import distributed

        if self.stats is None:
            moments = distributed.all_mean({"mean": scores.mean().item(), "sq": (scores ** 2).mean().item()})
            std = max(moments["sq"] - moments["mean"] ** 2, 0.0) ** 0.5
            self.stats = {"mean": moments["mean"], "std": std if std > 1e-6 else 1.0, "measured_on": measured_on}
        return self.stats


def load(spec: str | Path, dtype: str | None = None, device: torch.device | str | None = None,
         batch_size: int = 16, max_length: int | str = "run") -> RewardModel:
    """The reward model ``spec`` names (module docstring): a run of ours (``RunReward``, whose ``run`` says so:
    its adapter can sit on the policy's base, and it loads nothing until it scores) or a published model
    (``PublishedReward``, loaded now). ``max_length`` (run directories): "run" for the run's own
    ``rm.max_length``, or None for no limit but the model's positions (eval: every response gets a score)."""
    spec = str(spec)
    ref = spec[3:] if spec.startswith("rm:") else spec
    if not ref:
        raise UserError(f"{spec!r} names no reward model (rm:RUN_DIR, rm:MODEL_DIR or rm:HUB_ID)")
    found = modeling.find(ref, "reward model", "a reward model")
    if isinstance(found, modeling.ParentRun):
        return RunReward(found, device=device, batch_size=batch_size, max_length=max_length)
    return PublishedReward(ref, dtype=dtype, device=device, batch_size=batch_size)


class RunReward(RewardModel):
    """A reward-model run of this project (``run``); ``model`` and ``tokenizer`` when the caller already holds them
    (eval's shared base), else loaded from the run when first needed (PPO never needs them: its reward adapter
    sits on the policy's base, ``TokenReward``)."""

    def __init__(self, run: modeling.ParentRun | str | Path, model=None, tokenizer=None,
                 device: torch.device | str | None = None, batch_size: int = 32, max_length: int | str | None = "run",
                 progress: bool = False):
        self.run = run if isinstance(run, modeling.ParentRun) else modeling.read_run(run, "reward model")
        self.run_dir, self.batch_size, self.progress, self.device = self.run.dir, batch_size, progress, device
        self._model, self._tokenizer = model, tokenizer
        self.max_length = self.run.section("rm")["max_length"] if max_length == "run" else max_length
        self.stats = self.run.reward_stats

    def _load(self) -> None:
        if self._model is None:
            self._model, self._tokenizer = modeling.load_reward(self.run_dir, device=self.device)

    @property
    def model(self):
        self._load()
        return self._model

    @property
    def tokenizer(self):
        self._load()
        return self._tokenizer

    @property
    def config(self):
        return unwrap(self.model).config

    def __call__(self, prompts: list[list[dict]], responses: list[str | list[dict]],
                 tools: list[dict] | None = None) -> list[float | None]:
        seqs = encode_conversations(self.tokenizer, with_responses(prompts, responses), tools)
        fits = [i for i, s in enumerate(seqs) if self.max_length is None or len(s) <= self.max_length]
        out: list[float | None] = [None] * len(seqs)
        if fits:
            values = score_sequences(self.model, [seqs[i] for i in fits], self.tokenizer.pad_token_id,
                                              self.batch_size, self.progress).tolist()
            for i, v in zip(fits, values):
                out[i] = v
        return out


class TokenReward(RewardModel):
    """PPO's reward adapter on the policy's base: ``score_ids(ids, mask) -> [n]`` reads the policy's tokens."""

    reads_ids = True

    def __init__(self, score_ids: Callable, tokenizer, run_dir: Path, stats: dict | None, device: torch.device):
        self.score_ids, self.tokenizer, self.run_dir, self.stats = score_ids, tokenizer, run_dir, stats
        self.device = device

    @torch.no_grad()
    def episodes(self, prompts, responses, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.score_ids(ids, mask)

    @torch.no_grad()
    def __call__(self, prompts: list[list[dict]], responses: list[str | list[dict]],
                 tools: list[dict] | None = None) -> list[float | None]:
        seqs = encode_conversations(self.tokenizer, with_responses(prompts, responses), tools)
        ids, mask = pad(seqs, self.tokenizer.pad_token_id)
        return self.score_ids(ids.to(self.device), mask.to(self.device)).float().cpu().tolist()


def _config(spec: str):
    from transformers import AutoConfig

    path = Path(spec).expanduser()
    if not path.exists() and is_local(spec):
        raise UserError(f"{spec}: not found (a reward model is a run directory, a model directory or a hub id)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"{spec}: neither a run directory (no manifest.json) nor a model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else spec, trust_remote_code=False)
    except Exception as e:  # offline, unknown id, a damaged config: one line naming the model
        raise UserError(f"{spec}: could not load a model config ({type(e).__name__}: {str(e).splitlines()[0]})"
                        ) from None


def check(spec: str):
    """The model's config, refusing what is not a one-output sequence-classification model."""
    config = _config(spec)
    arch = list(getattr(config, "architectures", None) or [])
    if arch and not any(a.endswith("ForSequenceClassification") for a in arch):
        kind = "a causal language model" if any(a.endswith("ForCausalLM") for a in arch) else ", ".join(arch)
        raise UserError(f"{spec}: is {kind}, not a reward model (a sequence-classification model with one "
                        "output); train one with `rlhf rm`, or name a published reward model")
    if config.num_labels != 1:
        raise UserError(f"{spec}: has {config.num_labels} outputs; a reward model has one (a classifier with "
                        f"labels {list(getattr(config, 'id2label', {}).values())[:4]} is not a reward model)")
    return config


def identity(spec: str, config) -> dict:
    """What lineage records of a published model: the id or directory, the hub revision when known, and for a
    directory a hash of its config and weights files (names, sizes and the config's bytes)."""
    out = {"id": spec, "revision": getattr(config, "_commit_hash", None)}
    path = Path(spec).expanduser()
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.iterdir()):
            if f.is_file() and (f.suffix in (".json", ".safetensors", ".bin", ".model") or f.name == "tokenizer"):
                h.update(f.name.encode())
                h.update(str(f.stat().st_size).encode())
                if f.suffix == ".json":
                    h.update(f.read_bytes())
        out["directory_sha256"] = h.hexdigest()
    return out


class PublishedReward(RewardModel):
    """A published reward model, frozen, in eval mode, on ``device`` (module docstring)."""

    def __init__(self, spec: str, dtype: str | None = None, device: torch.device | str | None = None,
                 batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.spec, self.batch_size = spec, batch_size
        self.config = check(spec)
        source = str(Path(spec).expanduser()) if Path(spec).expanduser().exists() else spec
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
            self.model = AutoModelForSequenceClassification.from_pretrained(source, dtype=torch_dtype(dtype or "auto"),
                                                                            trust_remote_code=False)
        except Exception as e:
            raise UserError(f"{spec}: could not load the reward model ({type(e).__name__}: "
                            f"{str(e).splitlines()[0]})") from None
        self.model.requires_grad_(False).eval()
        self.model.to(device or modeling.accelerator())
        self.pad_token_id = self.model.config.pad_token_id
        self.identity = identity(spec, self.config)
        self.positions = max_positions(self.model.config)
        self.truncated = 0
        """conversations longer than the model's positions, cut from the left (``encode``)"""
        self._cutting_calls = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompt: list[dict], response: str | list[dict], tools: list[dict] | None = None) -> list[int]:
        """One conversation as this model reads it (module docstring). One longer than the model's positions is cut
        from the left, whatever the tokenizer's truncation side: the prompt's start goes, the response (what is
        scored, where the model pools) stays; a leading special token (BOS, CLS) is kept in front. Counted in
        ``truncated``. (Cut from the right, the response went and the prompt was scored, silently.)"""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(with_responses([prompt], [response])[0], tools=tools or None,
                                           tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            question = "\n".join(m["content"] for m in prompt)
            ids = tok(question, response if isinstance(response, str) else response[-1]["content"])["input_ids"]
        if self.positions is not None and len(ids) > self.positions:
            first = ids[:1] if ids[0] in set(tok.all_special_ids) else []
            ids = first + ids[len(ids) - self.positions + len(first):]
            self.truncated += 1
        return ids

    def _said(self) -> bool:
        """Whether to say it this time: the first call that cut, and every tenth after (PPO calls every step)."""
        self._cutting_calls += 1
        return self._cutting_calls % 10 == 1

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """The model's own forward on each token sequence (its pooled single logit); a sequence at a time for a
        model without a pad token (its forward could not tell padding from text)."""
        def forward(ids, mask):
            return self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits[:, 0].float()

        return by_length(sequences, forward, self.batch_size if self.pad_token_id is not None else 1,
                         self.pad_token_id or 0)

    def __call__(self, prompts: list[list[dict]], responses: list[str | list[dict]],
                 tools: list[dict] | None = None) -> list[float | None]:
        before = self.truncated
        sequences = [self.encode(p, r, tools) for p, r in zip(prompts, responses)]
        if self.truncated > before and self._said():
            print(f"rm:{self.spec}: {self.truncated - before} of {len(sequences)} conversations are longer than its "
                  f"{self.positions} positions: cut from the left (the prompt's start), keeping the response "
                  f"({self.truncated} so far)", file=sys.stderr)
        return self.score_ids(sequences)
