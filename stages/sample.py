"""Sample: a policy's responses to a prompt file, one greedy response each or K sampled candidates to rank.

The first half of InstructGPT's reward-model step: for each prompt the SFT model samples K responses, which a
person, a scorer or a reward model then ranks (``rlhf label``), and the reward model trains
on the rankings. Candidates are written as ranking rows without a ranking yet:

    {"prompt": ..., "responses": [K texts], "duplicate_of": [null | index of the first identical response],
     "eos": [K booleans: the response ended with EOS], "run": ..., "temperature": ..., "seed": ...,
     "max_new_tokens": ...[, "icl_shots": ..., "demos_sha256": the demonstrations file's digest]}

Several policies (``rlhf sample RUN1 RUN2 ...``, as InstructGPT and Llama 2 collected comparisons from their latest
policies) each give K responses to every prompt: a row holds their P x K responses, policy by policy, ``run`` is
the list of runs and ``policies`` names the run each response came from (``rlhf label`` keeps it in the rankings,
so a reward model's training data says where each response came from). All P policies are held at once.

Output goes to ``OUT.partial`` chunk by chunk and becomes ``OUT`` only when every prompt is done. Responses come
from the generation engine (``rollout.generate``), response j of prompt i drawing its noise from its own key
(``seed``, i * K + j), so an interrupted run continued with ``--resume`` writes the same file an uninterrupted one
would (on the same machine and library versions), whatever the batch size.

With an environment (``--env``, as ``ppo.environment`` names one) each response is a whole multi-turn episode
(``rlhf.engine.agent``): the list of messages after the prompt, the assistant's tool calls, the tools' results and
its last answer, in the shape OpenAI-style tool conversations take. The row gains the environment's ``tools`` (the
schemas the policy saw), ``env`` and ``episodes`` (per response: turns, tool calls, failed calls and why it
ended). Scorers read each episode's last answer; ``rlhf label`` ranks episodes as it ranks responses, and the
reward model trains on the whole episode, rendered with the tools (``encoding.encode_exchange``). The limits are
the first run's (``ppo.max_turns``, ``ppo.max_episode_tokens``, ...); ``--max-new-tokens`` bounds one turn.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from rlhf.engine import agent, environments, rollout
from rlhf.feedback import scorers
from rlhf.models import modeling
from rlhf.text import encoding, formats
from rlhf.text.formats import duplicates
from rlhf.config import ModelConfig
from rlhf.errors import UserError
from rlhf.names import run_name

CHUNK = 64
"""prompts per chunk (fewer when K is large: CHUNK_RESPONSES responses at most): the unit of progress and of
resume"""
CHUNK_RESPONSES = 1024
MAX_SAMPLES = 1024
"""the most responses per prompt (-k): a ranking of more is past what any labeller ranks, and all K of a prompt are
generated and held together"""

SETTINGS = ("run", "temperature", "seed", "max_new_tokens", "num_samples")
"""what a partial file must agree on to be continued"""


def load(run_dir: str):
    """The policy of a run directory, or a bare base given as ``base:PATH``; with its recipe (None for a base)."""
    if run_dir.startswith("base:"):
        cfg = ModelConfig(base=run_dir[5:])
        return modeling.load_base(cfg, device=modeling.accelerator()), modeling.load_tokenizer(cfg), None
    model, tokenizer = modeling.load_policy(run_dir)
    return model, tokenizer, modeling.read_run(run_dir).recipe


def fitting_prompts(policies: list, rows: list[list[dict]], max_new_tokens: int, source: str,
                    tools: list[dict] | None = None) -> list:
    """The prompts with room for ``max_new_tokens`` within every policy's positions (rendered with an
    environment's ``tools``); longer ones are left out."""
    for model, tokenizer, _ in policies:
        positions = modeling.max_positions(model.config)
        if positions is None:
            continue
        if max_new_tokens >= positions:
            raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                            f"{positions} positions")
        kept = encoding.encode_prompts(tokenizer, rows, positions - max_new_tokens, tools)[1]
        encoding.report_dropped("sample", len(rows) - len(kept), len(rows), f"prompts of {source}",
                                "(the model's positions - --max-new-tokens)", positions - max_new_tokens)
        rows = [rows[i] for i in kept]
    return rows


def prompt_field(messages: list[dict]):
    """A prompt as a row stores it: the text of a lone user turn, else the messages."""
    return messages[0]["content"] if len(messages) == 1 else messages


def chunk_prompts(num_samples: int) -> int:
    """Prompts per chunk for K = ``num_samples``."""
    return max(1, min(CHUNK, CHUNK_RESPONSES // num_samples))


def _whole_chunks(partial: Path, settings: dict, rows: list[list[dict]]) -> tuple[int, int]:
    """How many prompts of a partial file are in whole chunks (a cut chunk is redone), and the bytes they take.
    Every kept row must be the one this run would write there: the same settings, the prompt of that line of the
    prompt file (another --prompts or --limit is refused, not mixed in), K responses."""
    done, size, whole = 0, 0, (0, 0)
    runs = settings["run"]
    per_chunk = chunk_prompts(settings["num_samples"] * (len(runs) if isinstance(runs, list) else 1))
    continue_or_restart = "continue it with the same ones, or start again with --overwrite"
    with open(partial, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    for n, raw in enumerate(lines, 1):
        if n == len(lines):
            break  # what follows the last newline: empty, or a line cut short by the interruption (redone)
        try:
            row = json.loads(raw)
        except (ValueError, RecursionError):
            raise UserError(f"{partial}:{n}: not a JSON row; {continue_or_restart}") from None
        if not isinstance(row, dict):
            raise UserError(f"{partial}:{n}: not a row of rlhf sample; start again with --overwrite")
        differing = [k for k in (*SETTINGS, "icl_shots", "demos_sha256", "env") if row.get(k) != settings.get(k)]
        if differing:
            raise UserError(f"{partial}:{n}: was sampled with other settings ({', '.join(differing)}); "
                            f"{continue_or_restart}")
        if done >= len(rows):
            raise UserError(f"{partial}:{n}: more rows than the {len(rows)} prompts of this run (another --prompts "
                            f"or --limit?); {continue_or_restart}")
        if row.get("prompt") != prompt_field(rows[done]):
            raise UserError(f"{partial}:{n}: is not prompt {done + 1} of the prompt file (another --prompts or "
                            f"--limit?); {continue_or_restart}")
        responses = row.get("responses")
        want = settings["num_samples"] * (len(settings["run"]) if isinstance(settings["run"], list) else 1)
        if not isinstance(responses, list) or len(responses) != want or not all(
                isinstance(r, list if settings.get("env") else str) for r in responses):
            raise UserError(f"{partial}:{n}: needs {want} responses ({'episodes' if settings.get('env') else 'texts'})"
                            "; start again with --overwrite")
        done, size = done + 1, size + len(raw) + 1
        if done % per_chunk == 0 or done == len(rows):
            whole = (done, size)
    return whole


def main(run_dirs: list[str] | str, prompts: str, out: str | None, num_samples: int = 1,
         temperature: float | None = None, max_new_tokens: int | None = None, seed: int = 0, limit: int | None = None,
         scorer_specs: list[str] = (), overwrite: bool = False, resume: bool = False, batch_size: int = 128,
         icl_shots: int = 0, demos: str | None = None, env: str | None = None, progress: bool = False,
         echo=print) -> int:
    """Sample and write (or print) the responses of one policy or several (``run_dirs``); returns the number of
    prompts done. Unset, the temperature and length are the first run's PPO settings. ``icl_shots``: each
    ``base:`` policy answers every prompt after that many demonstrations from ``demos`` (an SFT file), as eval's
    in-context row does; the row keeps the prompt alone. ``env``: each response is an episode (module docstring)."""
    run_dirs = policy_names(run_dirs, num_samples)
    demo_rows = demonstrations(run_dirs, icl_shots, demos, env)
    environment = environments.load(env, "--env") if env else None
    per_prompt = num_samples * len(run_dirs)
    scorer_list = scorers.load_all(list(scorer_specs), "--scorer")
    target, partial = output_paths(out, overwrite, resume)  # before loading a model: the cheap mistakes first
    rows = formats.load(prompts, "prompts").rows[:limit]

    policies = [load(r) for r in run_dirs]
    temperature, max_new_tokens = sampling(policies[0][2], temperature, max_new_tokens, num_samples, per_prompt)
    play = None if environment is None else agent.Play(environment, environments.Limits.of(
        (policies[0][2] or {}).get("ppo", {})))
    rows = fitting_prompts(policies, rows, max_new_tokens if play is None else play.limits.max_tokens, prompts,
                           tools=None if play is None else play.tools)
    settings = {"run": run_dirs[0] if len(run_dirs) == 1 else run_dirs, "temperature": temperature, "seed": seed,
                "max_new_tokens": max_new_tokens, "num_samples": num_samples,
                **({"icl_shots": icl_shots, "demos_sha256": formats.sha256(demos)} if icl_shots else {}),
                **({"env": env} if env else {})}

    done = continued(partial, resume, settings, rows)
    sink = open(partial, "a" if done else "w", encoding="utf-8") if partial is not None else None
    per_chunk = chunk_prompts(per_prompt)
    try:
        for start in range(done, len(rows), per_chunk):
            chunk = rows[start:start + per_chunk]
            repeated = [messages for messages in chunk for _ in range(per_prompt)]
            inputs = [with_demonstrations(r, p, chunk, start, demo_rows, icl_shots, seed, max_new_tokens)
                      for r, p in zip(run_dirs, policies)]
            gens = generate_mixed(policies, inputs, start, num_samples, max_new_tokens, batch_size, temperature,
                                  seed, progress, play)
            scored = {s.name: s(repeated, gens.texts) for s in scorer_list}
            for line in lines(chunk, gens, scored, per_prompt, settings, quick=target is None and per_prompt == 1,
                              tools=None if play is None else play.tools):
                if len(run_dirs) > 1:
                    line["policies"] = [r for r in run_dirs for _ in range(num_samples)]
                if sink is None:
                    echo(json.dumps(line))
                else:
                    sink.write(json.dumps(line) + "\n")
            if sink is not None:
                sink.flush()
                os.fsync(sink.fileno())
                print(f"sample: {min(start + per_chunk, len(rows))}/{len(rows)} prompts", file=sys.stderr)
    finally:
        if sink is not None:
            sink.close()
            if partial.stat().st_size == 0:  # failed before a chunk was kept: nothing to resume, nothing in the way
                partial.unlink()
    if target is not None:
        os.replace(partial, target)
    return len(rows)


def continued(partial: Path | None, resume: bool, settings: dict, rows: list[list[dict]]) -> int:
    """The prompts a partial file being resumed already holds in whole chunks (the cut chunk after them is
    removed), else 0."""
    if partial is None or not partial.exists() or not resume:
        return 0
    done, size = _whole_chunks(partial, settings, rows)
    os.truncate(partial, size)
    print(f"sample: resuming after {done} of {len(rows)} prompts", file=sys.stderr)
    return done


def policy_names(run_dirs: list[str] | str, num_samples: int) -> list[str]:
    """The policies to sample from, each spelt one way (``names.run_name``), checked: none named twice, and from 1
    to ``MAX_SAMPLES`` responses per prompt in all."""
    run_dirs = [run_name(r) for r in ([run_dirs] if isinstance(run_dirs, str) else list(run_dirs))]
    same = [str(Path(r[5:] if r.startswith("base:") else r).expanduser().resolve()) for r in run_dirs]
    if len(set(same)) < len(same):  # one run under two spellings (runs/sft and runs/sft/) is one policy
        raise UserError(f"a policy is named twice ({', '.join(run_dirs)})")
    per_prompt = num_samples * len(run_dirs)
    if not 1 <= per_prompt <= MAX_SAMPLES:
        raise UserError(f"--num-samples must be from 1 to {MAX_SAMPLES}, got {num_samples}" if len(run_dirs) == 1
                        else f"--num-samples x {len(run_dirs)} policies must be from 1 to {MAX_SAMPLES}, got "
                             f"{per_prompt}")
    return run_dirs


def sampling(recipe: dict | None, temperature: float | None, max_new_tokens: int | None, num_samples: int,
             per_prompt: int) -> tuple[float, int]:
    """The temperature and length to sample with: as given, else the first run's PPO settings (candidates are
    sampled as PPO samples; one response per prompt is greedy)."""
    if temperature is None:
        temperature = (recipe or {}).get("ppo", {}).get("temperature", 1.0) if per_prompt > 1 else 0.0
    if num_samples > 1 and temperature == 0:
        raise UserError("--num-samples above 1 needs a temperature above 0 (greedy responses are all the same)")
    if max_new_tokens is None:
        max_new_tokens = (recipe or {}).get("ppo", {}).get("max_new_tokens", 64)
    return temperature, max_new_tokens


@dataclass
class Mixed:
    """The responses of a chunk's prompts, prompt by prompt, policy by policy (what ``lines`` reads)."""

    texts: list[str]
    """what scorers read: each response, or each episode's last answer"""
    stopped: list[bool]
    episodes: list[agent.Episode] | None = None
    """with an environment: the episodes themselves"""

    @property
    def responses(self) -> list:
        """What a row stores: the texts, or each episode's messages."""
        return self.texts if self.episodes is None else [e.messages for e in self.episodes]


def demonstrations(run_dirs: list[str], icl_shots: int, demos: str | None, env: str | None = None) -> list[dict]:
    """The SFT rows ``base:`` policies draw demonstrations from (none without ``icl_shots``), checked."""
    if not icl_shots:
        return []
    if env:
        raise UserError("--icl-shots cannot be combined with --env (demonstrations are single responses)")
    if not any(r.startswith("base:") for r in run_dirs):
        raise UserError("--icl-shots gives demonstrations to base: policies, and none is named")
    if not demos:
        raise UserError("--icl-shots needs --demos, an SFT file to draw the demonstrations from")
    rows = formats.load(demos, "sft", on_bad_row="drop").rows
    if len(rows) < icl_shots:
        raise UserError(f"{demos}: {len(rows)} demonstrations, fewer than --icl-shots {icl_shots}")
    return rows


def with_demonstrations(run: str, policy, chunk: list[list[dict]], start: int, demos: list[dict], shots: int,
                        seed: int, max_new_tokens: int) -> list[list[dict]]:
    """What a policy answers: the prompts themselves, or for a ``base:`` policy with demonstrations each prompt
    after ``shots`` of them, drawn for prompt i from its own seed (the same whatever the chunk), fewer where they
    would not fit the model's positions with ``max_new_tokens``."""
    if not (shots and run.startswith("base:")):
        return chunk
    model, tokenizer, _ = policy
    inputs = [encoding.icl_prompts([m], demos, shots, seed * 1_000_003 + start + i)[0] for i, m in enumerate(chunk)]
    positions = modeling.max_positions(model.config)
    return inputs if positions is None else encoding.fit_icl(tokenizer, inputs, chunk, positions - max_new_tokens)[0]


def generate_mixed(policies: list, inputs: list[list[list[dict]]], start: int, k: int, max_new_tokens: int,
                   batch_size: int, temperature: float, seed: int, progress: bool,
                   play: agent.Play | None = None) -> Mixed:
    """K responses of each policy to each of its ``inputs`` (one list per policy: the chunk of prompts from prompt
    ``start`` on, as that policy reads them), or K episodes with ``play``'s environment; response j of policy p to
    prompt i draws its noise from key ``(i * P + p) * K + j`` (one policy: ``i * K + j``, as ever)."""
    P, n = len(policies), len(inputs[0])
    texts, stopped, episodes = [None] * (n * P * k), [None] * (n * P * k), [None] * (n * P * k)
    for p, (model, tokenizer, _) in enumerate(policies):
        slots = [(i * P + p) * k + j for i in range(n) for j in range(k)]
        prompts, indices = [m for m in inputs[p] for _ in range(k)], [start * P * k + slot for slot in slots]
        if play is None:
            gens = rollout.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    temperature=temperature, seed=seed, indices=indices, progress=progress)
            made = zip(gens.texts, gens.stopped, [None] * len(slots))
        else:
            played = agent.generate(model, tokenizer, prompts, play.env, play.limits, max_new_tokens, batch_size,
                                    temperature, seed, indices, progress=progress)
            made = ((e.answer.strip(), e.stopped, e) for e in played)
        for slot, (text, stop, episode) in zip(slots, made):
            texts[slot], stopped[slot], episodes[slot] = text, stop, episode
    return Mixed(texts, stopped, episodes if play is not None else None)


def output_paths(out: str | None, overwrite: bool, resume: bool) -> tuple[Path | None, Path | None]:
    """The output file and its ``.partial`` beside it (None, None: print to stdout), checked: an existing output
    needs --overwrite, an interrupted one --resume or --overwrite, and the folder must exist."""
    if not out:
        return None, None
    target = Path(out)
    partial = target.with_name(target.name + ".partial")
    if target.exists() and not overwrite:
        raise UserError(f"{target}: exists (--overwrite replaces it)")
    if partial.exists() and not (resume or overwrite):
        raise UserError(f"{partial}: an interrupted run's output (--resume continues it, --overwrite starts again)")
    if not target.parent.is_dir():
        raise UserError(f"{target.parent}: no such directory")
    return target, partial


def lines(chunk: list[list[dict]], gens: Mixed, scored: dict, num_samples: int, settings: dict, quick: bool,
          tools: list[dict] | None = None) -> list[dict]:
    """One output line per prompt of ``chunk``: its K responses with their duplicates, EOS flags, the settings and
    the scorers' values; with ``quick`` (one greedy response, printed) just the prompt's text, the response, its
    EOS flag and the scores that apply. Episodes add the environment's ``tools`` and what each episode did (with
    ``quick``: the episode's messages beside its answer)."""
    out = []
    for i, messages in enumerate(chunk):
        at = slice(i * num_samples, (i + 1) * num_samples)
        responses = gens.responses[at]
        records = None if gens.episodes is None else [e.record() for e in gens.episodes[at]]
        if quick:
            line = {"prompt": messages[-1]["content"], "response": gens.texts[at][0], "eos": gens.stopped[at][0]}
            if records:
                line.update({"episode": responses[0], **records[0]})
            line.update({name: v[at][0] for name, v in scored.items() if v[at][0] is not None})
        else:
            line = {"prompt": prompt_field(messages), "responses": responses, "duplicate_of": duplicates(responses),
                    "eos": gens.stopped[at], **settings}
            if records:
                line.update({"tools": tools, "episodes": records})
            if scored:
                line["scores"] = {name: v[at] for name, v in scored.items()}
        out.append(line)
    return out
