"""Published reward models: any Hugging Face sequence-classification model with one output, by hub id or directory.

``--reward`` (eval, PPO), ``rlhf label --by`` and scorer specs (``rm:ID``) take a reward-model run of this project
or such a model. A model that is not a run brings its own tokenizer, chat template and dtype; each conversation is
rendered with ITS chat template (the whole conversation, as reward-model leaderboards score), tokenised with its
tokenizer, and scored by the model's own forward, which pools where its authors' code pools (its
``config.pad_token_id`` convention: batches are right-padded with that id, or scored one at a time when the model
has none, as transformers requires). A tokenizer without a chat template gets the prompt and the response as a
text pair (the convention of encoder reward models such as OpenAssistant's DeBERTa ones). The policy's tokens are
never fed to it: text goes in.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from rlhf.errors import UserError
from rlhf.names import is_local, torch_dtype



def is_run(spec: str | Path) -> bool:
    """Whether ``spec`` is a run directory of this project (it has a manifest)."""
    return (Path(spec) / "manifest.json").is_file()


def _config(spec: str):
    from transformers import AutoConfig

    path = Path(spec).expanduser()
    if not path.exists() and is_local(spec):
        raise UserError(f"{spec}: not found (a reward model is a run directory, a model directory or a hub id)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"{spec}: neither a run directory (no manifest.json) nor a model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else spec)
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
    """What lineage records: the id or directory, the hub revision when known, and for a directory a hash of its
    config and weights files (names, sizes and the config's bytes)."""
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


class ExternalRewardModel:
    """A published reward model, frozen, in eval mode, on ``device``; call it like a scorer:
    ``rm(prompts, responses) -> [float]`` (prompts as message lists, responses as text)."""

    def __init__(self, spec: str, dtype: str | None = None, device: torch.device | str | None = None,
                 batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rlhf import modeling

        self.spec, self.batch_size = spec, batch_size
        self.config = check(spec)
        source = str(Path(spec).expanduser()) if Path(spec).expanduser().exists() else spec
        kwargs = {"dtype": torch_dtype(dtype or "auto")}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
        except Exception as e:
            raise UserError(f"{spec}: could not load the reward model ({type(e).__name__}: "
                            f"{str(e).splitlines()[0]})") from None
        self.model.requires_grad_(False).eval()
        self.model.to(device or modeling.accelerator())
        self.pad_token_id = self.model.config.pad_token_id
        self.identity = identity(spec, self.config)
        self.positions = modeling.max_positions(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompt: list[dict], response: str) -> list[int]:
        """One conversation as this model reads it (module docstring)."""
        tok = self.tokenizer
        conversation = [*prompt, {"role": "assistant", "content": response}]
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(conversation, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            question = "\n".join(m["content"] for m in prompt)
            ids = tok(question, response)["input_ids"]
        if self.positions is not None and len(ids) > self.positions:
            ids = ids[-self.positions:] if tok.truncation_side == "left" else ids[:self.positions]
        return ids

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """The model's own forward on each token sequence (its pooled single logit)."""
        from rlhf import modeling

        out = [0.0] * len(sequences)
        size = self.batch_size if self.pad_token_id is not None else 1
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        for start in range(0, len(order), size):
            idx = order[start:start + size]
            ids, mask = modeling.pad([sequences[i] for i in idx], self.pad_token_id or 0, "right")
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for i, v in zip(idx, logits[:, 0].float().cpu().tolist()):
                out[i] = v
        return out

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        return self.score_ids([self.encode(p, r) for p, r in zip(prompts, responses)])

    def describe(self) -> dict:
        return {"external": self.identity}


def measured_stats(scores: torch.Tensor, measured_on: str) -> dict:
    """Mean and std of a reward model's scores over every process's samples (PPO normalises a published model's
    score by those of its first step: it has no manifest to read them from); a constant score gets std 1."""
    from rlhf import distributed

    moments = distributed.all_mean({"mean": scores.mean().item(), "sq": (scores ** 2).mean().item()})
    std = max(moments["sq"] - moments["mean"] ** 2, 0.0) ** 0.5
    return {"mean": moments["mean"], "std": std if std > 1e-6 else 1.0, "measured_on": measured_on}


def run_scorer(run_dir: str | Path):
    """A reward-model run of this project as a scorer: its score of each response (None for one longer than its
    rm.max_length, which it never learnt to read)."""
    from rlhf import modeling

    model, tokenizer = modeling.load_reward(run_dir)
    max_length = modeling.read_run(run_dir).section("rm")["max_length"]

    def score(prompts: list[list[dict]], responses: list[str]) -> list[float | None]:
        seqs = [sum(modeling.encode_exchange(tokenizer, p, [{"role": "assistant", "content": r}]), [])
                for p, r in zip(prompts, responses)]
        fits = [i for i, s in enumerate(seqs) if len(s) <= max_length]
        out: list[float | None] = [None] * len(seqs)
        if fits:
            values = modeling.score_sequences(model, [seqs[i] for i in fits], tokenizer.pad_token_id).tolist()
            for i, v in zip(fits, values):
                out[i] = v
        return out

    return score


def scorer_for(spec: str, dtype: str | None = None):
    """Any reward model as a scorer callable: a run directory of this project, or a published model."""
    return run_scorer(spec) if is_run(spec) else ExternalRewardModel(spec, dtype=dtype)
