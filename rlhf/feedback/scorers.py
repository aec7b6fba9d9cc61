"""Scorers: one idea of "how good is this response", for eval's columns, for labelling, and for PPO's reward.

A scorer is a Python callable that takes a batch and returns one number per row, or None where it does not apply:

    def score(prompts: list[list[dict]], responses: list[str]) -> list[float | None]

``prompts`` are chat messages (``{"role", "content"}``, the last one the user's turn being answered) and
``responses`` the generated texts (stripped of surrounding whitespace). A batch at a time, so a scorer can run a model or a process pool; a class is
instantiated once (no arguments) and its instances called, so it can load what it needs in ``__init__``.

A recipe names a scorer by a *spec*:

- a built-in name (``BUILTIN``): ``gold``, ``correctness``, ``style`` (the tiny world's scorer and its halves), and
  ``correct_add``, ``correct_sort``, ``correct_reverse``, ``correct_count`` (correctness by task kind);
- a Python reference, ``package.module:function`` (importable) or ``path/to/file.py:function`` (relative to the
  current directory);
- a reward model, ``rm:`` and a run directory of this project, a model directory or a hub id of a published
  sequence-classification reward model (``rlhf.feedback.rewards``; named ``rm`` unless labelled); a directory needs no
  ``rm:``;
- an LLM judge, ``judge:`` and a causal chat model (a model directory, a hub id or a policy run): its probability
  of answering "Yes" to whether the response is correct and helpful (``rlhf.feedback.judge``; named ``judge`` unless
  labelled);
- any of those under a label of your own, ``label=spec`` (the label names its column and metrics).

Errors are the user's to fix and say so in one line (``UserError``): a reference that does not load, an object
that is not callable, a scorer that raises (the row it raised on is named) or returns something other than one
number or None per row.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rlhf.errors import UserError

BUILTIN = {
    "gold": ("rlhf.tiny.world", "gold_scores",
             "the tiny world's gold score, 0.5 x correctness + 0.5 x style (None for prompts from elsewhere)"),
    "correctness": ("rlhf.tiny.world", "correctness_scores",
                    "1 for the tiny world's exact answer (lists: the share of positions right), else 0"),
    "style": ("rlhf.tiny.world", "style_scores", "1 for the tiny world's concise form 'The answer is X.', else 0"),
    **{f"correct_{kind}": ("rlhf.tiny.world", f"correct_{kind}_scores",
                           f"correctness on the tiny world's {kind} tasks alone (None on the others)")
       for kind in ("add", "sort", "reverse", "count")},
}
"""name -> (module, function, what it measures)"""

REWARD_MODEL = "reward_model"
"""the key of ``ppo.reward`` that weighs the reward model's (normalised) score"""

RESERVED = frozenset({"policy", "prompt_index", "sample", "prompt", "response", "reward", "eos", "length", "kl",
                      "responses", "win_rate_vs_first", "eos_rate", REWARD_MODEL})
"""names a scorer may not take: eval's own record and summary fields"""


@dataclass
class Scorer:
    """A loaded scorer: its name (column and metric), the spec it came from, and the callable."""

    name: str
    spec: str
    fn: Callable

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> list[float | None]:
        """The scores of a batch, checked: one finite number (or None) per row. The scorer sees each response
        without surrounding whitespace."""
        if not prompts:
            return []
        responses = [r.strip() for r in responses]
        try:
            out = self.fn(prompts, responses)
        except Exception as e:  # the user's code: find the row it fails on, and say so
            row = self._failing_row(prompts, responses)
            raise UserError(f"scorer {self.name} ({self.spec}) raised {_describe(e)}{row}") from None
        try:
            out = list(out)
        except TypeError:
            raise UserError(f"scorer {self.name} ({self.spec}) returned {type(out).__name__}, not a list of numbers "
                            "(one per response)") from None
        if len(out) != len(responses):
            raise UserError(f"scorer {self.name} ({self.spec}) returned {len(out)} values for {len(responses)} "
                            "responses (one per response, None where it does not apply)")
        values = []
        for i, v in enumerate(out):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) and not _is_number(v)):
                raise UserError(f"scorer {self.name} ({self.spec}) returned {v!r} for row {i + 1} "
                                f"({_quote(prompts[i])}): not a number or None")
            v = None if v is None else float(v)
            if v is not None and not math.isfinite(v):
                raise UserError(f"scorer {self.name} ({self.spec}) returned {v} for row {i + 1} ({_quote(prompts[i])})")
            values.append(v)
        return values

    def _failing_row(self, prompts, responses) -> str:
        """`` on row i (prompt ...)`` for the first row that raises alone, or nothing when none does."""
        for i, (p, r) in enumerate(zip(prompts, responses)):
            try:
                self.fn([p], [r])
            except Exception:
                return f" on row {i + 1} ({_quote(p)}, response {r[:60]!r})"
        return ""


def candidate_scores(scorer: Scorer, prompt: list[dict], responses: list, tools: list[dict] | None = None
                     ) -> list[float | None]:
    """One prompt's candidates scored (``rlhf label``, the labelling page's suggestions): texts, or episodes of an
    environment (lists of messages, ``rlhf sample --env``), which a reward model scores whole, rendered with their
    ``tools`` as it trained, and every other scorer by its last answer."""
    from rlhf.feedback import rewards
    from rlhf.text.formats import answer

    prompts = [prompt] * len(responses)
    if isinstance(scorer.fn, rewards.RewardModel) and any(isinstance(r, list) for r in responses):
        values = scorer.fn(prompts, responses, tools=tools or None)
        require_finite(values, scorer.spec, prompts)
        return values
    return scorer(prompts, [answer(r) for r in responses])


def require_finite(values, who: str, prompts: list[list[dict]], where: str = "") -> None:
    """Stop with one line naming the model and the row when a score is NaN or infinite (None: does not apply).
    A NaN orders nothing: sorted, it would rank responses arbitrarily; averaged, it poisons every statistic."""
    for i, v in enumerate(values):
        v = v.item() if hasattr(v, "item") else v
        if v is not None and not math.isfinite(v):
            raise UserError(f"{who} scored response {i + 1}{where} ({_quote(prompts[i])}) as {v}, not a finite number")


def _is_number(v) -> bool:
    """A numpy or torch scalar (anything with ``item()`` giving a real number)."""
    item = getattr(v, "item", None)
    if item is None or getattr(v, "ndim", 0) != 0:
        return False
    try:
        x = item()
    except Exception:
        return False
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _describe(e: Exception) -> str:
    text = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _quote(prompt: list[dict]) -> str:
    content = prompt[-1].get("content", "") if prompt else ""
    return f"prompt {content[:60]!r}"


def import_reference(module: str, where: str, what: str = "scorer"):
    """The module a reference names (``module`` of ``module:NAME``): a Python file (``.py``, loaded once) or an
    importable module; a missing one or one that raises on import is a one-line error naming it (``what`` it is
    the ``what`` of: a scorer, an environment)."""
    if module.endswith(".py"):
        path = Path(module).expanduser()
        if not path.is_file():
            raise UserError(f"{where}: {what} file {module} not found")
        name = f"rlhf_{what}_{abs(hash(str(path.resolve())))}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded
        try:
            spec.loader.exec_module(loaded)
        except Exception as e:
            del sys.modules[name]
            raise UserError(f"{where}: importing {what} file {module} raised {_describe(e)}") from None
        return loaded
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise UserError(f"{where}: {what} module {module} not found ({e.name} is not importable)") from None
    except Exception as e:
        raise UserError(f"{where}: importing {what} module {module} raised {_describe(e)}") from None


def load(spec: str, where: str = "scorer") -> Scorer:
    """The scorer a spec names (module docstring); ``where`` (a recipe key) starts every error."""
    label, ref = spec.split("=", 1) if "=" in spec else (None, spec)
    label, ref = (label.strip() if label else None), ref.strip()
    if ref.startswith("judge:"):  # a causal chat model asked to grade (rlhf.feedback.judge)
        from rlhf.feedback import judge

        return _named(label or "judge", spec, ref, judge.Judge(ref[6:]), where)
    if ref.startswith("rm:") or Path(ref).expanduser().is_dir():  # a reward model: a run or model directory, a hub id
        from rlhf.feedback import rewards

        if ref == "rm:":
            raise UserError(f"{where}: scorer {spec!r} names no reward model (rm:RUN_DIR, rm:MODEL_DIR or rm:HUB_ID)")
        return _named(label or "rm", spec, ref, rewards.load(ref), where)
    if ref in BUILTIN:
        module, attr, _ = BUILTIN[ref]
        name = ref
    elif ":" in ref:
        module, attr = ref.rsplit(":", 1)
        name = attr
        if not module or not attr:
            raise UserError(f"{where}: scorer {spec!r} must be package.module:function or path/to/file.py:function")
    else:
        close = difflib.get_close_matches(ref, BUILTIN, n=1)
        raise UserError(f"{where}: unknown scorer {spec!r}" + (f" (did you mean {close[0]!r}?)" if close else
                        f"; built-in: {', '.join(BUILTIN)}, or package.module:function, or file.py:function"))
    obj = getattr(import_reference(module, where), attr, None)
    if obj is None:
        raise UserError(f"{where}: {module} has no {attr!r} (scorer {spec!r})")
    if inspect.isclass(obj):
        try:
            obj = obj()
        except Exception as e:
            raise UserError(f"{where}: creating scorer {spec!r} ({attr}()) raised {_describe(e)}") from None
    if not callable(obj):
        raise UserError(f"{where}: scorer {spec!r} is a {type(obj).__name__}, not callable")
    return _named(label or name, spec, ref, obj, where)


def _named(name: str, spec: str, ref: str, obj, where: str) -> Scorer:
    if name in RESERVED:
        raise UserError(f"{where}: a scorer may not be named {name!r} (eval's own column); give it a label: "
                        f"my_{name}={ref}")
    return Scorer(name, ref, obj)


def load_all(specs: list[str], where: str) -> list[Scorer]:
    """Several scorers, with distinct names."""
    scorers = [load(spec, where) for spec in specs]
    names = [s.name for s in scorers]
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"{where}: two scorers are named {name!r}; label one: other_{name}=...")
    return scorers


def reward_terms(weights: dict[str, float], where: str) -> tuple[float, list[tuple[Scorer, float]]]:
    """``ppo.reward`` read: the reward model's weight (0: none) and each scorer with its weight."""
    model = float(weights.get(REWARD_MODEL, 0.0))
    terms = [(s, float(weights[spec])) for spec, s in
             zip([k for k in weights if k != REWARD_MODEL],
                 load_all([k for k in weights if k != REWARD_MODEL], where))]
    return model, [(s, w) for s, w in terms if w != 0.0]
