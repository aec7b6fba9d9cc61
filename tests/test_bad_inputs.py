"""The bad-input corpus: each case runs the ``rlhf`` command and must exit with code 2, print one line that names
the file and line or the recipe key, show no traceback, and leave nothing that looks like a finished output.

Every case runs in-process through click (the same command objects, error handler and exit code, without an
interpreter start-up each); ``REAL_PROCESS`` cases also run as a real ``rlhf`` process, for the path from the
entry point to the exit status. Data files live in tests/bad_inputs/; the cases marked as needing runs are made
from small real runs (the ``parents`` fixture) and the others, which need none, are in the fast tier."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import ROOT, run_cli, write_recipe

BAD = Path(__file__).parent / "bad_inputs"
SMALL_PPO = ["--set", "ppo.batch_size=2", "--set", "ppo.mini_batch_size=2", "--set", "ppo.micro_batch_size=2",
             "--set", "ppo.max_steps=1", "--set", "ppo.eval_every=0"]


def data(key: str, name: str, stage: str, *extra: str):
    return lambda ctx: [stage, "--recipe", ctx.recipe, "--set", f"data.{key}={BAD / name}", *extra]


def recipe_set(stage: str, *assignments: str):
    return lambda ctx: [stage, "--recipe", ctx.recipe, *[x for a in assignments for x in ("--set", a)]]


def another_base(ctx):
    """An SFT run whose manifest names a base of another shape than its adapter was made for."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from rlhf.models import modeling
    from rlhf.runs import provenance

    other = ctx.tmp / "other-base"
    tok = modeling.load_tokenizer(modeling.ModelConfig(base=str(ROOT / "data" / "tiny-base")))
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(other)
    tok.save_pretrained(other)
    run = ctx.copy_run("sft", "moved-sft")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["base"] = str(other)
    manifest["resolved"]["base"] = provenance.base_record(str(other))  # recorded where and what it is, too
    (run / "manifest.json").write_text(json.dumps(manifest))
    return ["sample", str(run), "--prompts", str(ROOT / "data/tiny/heldout_prompts.jsonl"), "--limit", "2"]


def truncated_weights(ctx):
    run = ctx.copy_run("sft", "truncated-sft")
    weights = run / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return ["eval", "--recipe", ctx.recipe, "--policy", str(run), "--reward", str(ctx.runs / "rm"),
            "--set", "eval.limit=2", "--set", "eval.icl_shots=0"]


def unfinished_run(ctx):
    run = ctx.copy_run("rm", "unfinished-rm")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(manifest))
    return ["ppo", "--recipe", ctx.recipe, "--reward", str(run), *SMALL_PPO]


def finished_output(ctx):
    ctx.out.mkdir()
    (ctx.out / "manifest.json").write_text("{}")
    return ["sft", "--recipe", ctx.recipe]


def parent_is_a_file(ctx):
    blocker = ctx.tmp / "blocker"
    blocker.write_text("a file where a folder should be")
    ctx.out = blocker / "out"
    return ["sft", "--recipe", ctx.recipe, "--set", "sft.max_steps=1"]


def deeply_nested(name: str, stage: str):
    """A file of 100,000 nested brackets (Python's JSON reader recurses: RecursionError), built in the test."""
    def build(ctx):
        path = ctx.tmp / name
        nested = "[" * 100_000 + "]" * 100_000
        path.write_text(nested + "\n" if name.endswith(".json") else '{"prompt": ' + nested + ', "completion": "x"}\n')
        if stage == "sample":
            return ["sample", "base:" + str(ROOT / "data/tiny-base"), "--prompts", str(path), "--limit", "2"]
        return [stage, "--recipe", ctx.recipe, "--set", f"data.sft={path}"]
    return build


def duplicate_key(ctx):
    return ["sft", "--recipe", str(BAD / "recipe_duplicate_key.yaml")]


# (case id, how to build the command, what the one-line message must contain)
CASES = [
    ("sft-deeply-nested", deeply_nested("deep.jsonl", "sft"), "deep.jsonl:1: JSON nested too deeply to read"),
    ("sample-deeply-nested", deeply_nested("deep.json", "sample"), "deep.json: JSON nested too deeply to read"),
    ("sft-json-array-row-from-1", data("sft", "sft_array_missing_field.json", "sft"),
     "sft_array_missing_field.json: row 2: missing field 'completion'"),
    ("pref-infinite-margin", data("preference", "pref_infinite_margin.jsonl", "rm"),
     "pref_infinite_margin.jsonl:2: field 'margin' is inf, not a finite number"),
    ("rank-infinite-rank", data("preference", "rank_infinite_rank.jsonl", "rm"),
     "rank_infinite_rank.jsonl:1: field 'ranks[2]' is inf, not a finite number"),
    ("recipe-duplicate-key", duplicate_key,
     "recipe_duplicate_key.yaml:4: key 'lr' is written twice in one section (first at line 2)"),
    ("recipe-infinite-value", recipe_set("sft", "sft.lr=.inf"), "sft.lr must be a finite number, got inf"),
    ("adapter-target-matches-nothing", recipe_set("sft", "adapter.target_modules=[nonexistent_proj]"),
     "adapter.target_modules: 'nonexistent_proj' matches no module of LlamaForCausalLM (its layers: down_proj,"),
    ("sft-invalid-json", data("sft", "sft_invalid_json.jsonl", "sft"), "sft_invalid_json.jsonl:2: invalid JSON"),
    ("sft-missing-field", data("sft", "sft_missing_field.jsonl", "sft"), ":2: missing field 'completion'"),
    ("sft-wrong-type", data("sft", "sft_wrong_type.jsonl", "sft"), ":2: field 'prompt' must be a string"),
    ("sft-empty-response", data("sft", "sft_empty_response.jsonl", "sft"), ":2: empty response"),
    ("sft-not-utf8", data("sft", "sft_not_utf8.jsonl", "sft"), ":2: not valid UTF-8"),
    ("sft-empty-file", data("sft", "sft_empty.jsonl", "sft"), "sft_empty.jsonl: no rows"),
    ("sft-unknown-role", data("sft", "sft_unknown_role.jsonl", "sft"), ":2: messages[0] has unknown role"),
    ("sft-not-an-object", data("sft", "sft_not_an_object.jsonl", "sft"), ":2: expected a JSON object"),
    ("sft-csv-wrong-columns", data("sft", "sft_wrong_columns.csv", "sft"), "sft_wrong_columns.csv:2: "),
    ("sft-json-invalid", data("sft", "sft_invalid.json", "sft"), "sft_invalid.json:2: invalid JSON"),
    ("sft-unsupported-file", data("sft", "sft_unsupported.txt", "sft"), "unsupported file type '.txt'"),
    ("sft-missing-file", recipe_set("sft", "data.sft=tests/bad_inputs/nowhere.jsonl"), "data.sft names"),
    ("pref-identical", data("preference", "pref_identical.jsonl", "rm"), ":2: chosen and rejected are identical"),
    ("pref-missing-rejected", data("preference", "pref_missing_rejected.jsonl", "rm"),
     ":2: missing field 'rejected'"),
    ("pref-bad-margin", data("preference", "pref_bad_margin.jsonl", "rm"), ":1: field 'margin' must be a number"),
    ("pref-no-dialogue", data("preference", "pref_no_dialogue.jsonl", "rm"), ":1: field 'chosen' is not a dialogue"),
    ("rank-not-a-ranking", data("preference", "rank_not_a_ranking.jsonl", "rm"),
     "rank_not_a_ranking.jsonl:2: field 'ranking' has 2 places for 3 responses"),
    ("rank-all-tied", data("preference", "rank_all_tied.jsonl", "rm"), ":2: every response is tied"),
    ("rank-argilla-dangling", data("preference", "rank_argilla_dangling.jsonl", "rm"),
     "rank_argilla_dangling.jsonl:2: ranking[1].value 'reply-3' names no field of the row, where the others do"),
    ("rank-argilla-no-fields", data("preference", "rank_argilla_no_fields.jsonl", "rm"),
     "rank_argilla_no_fields.jsonl:1: ranking[*].value ('reply-1', 'reply-2') name no field of the row"),
    ("rank-ranking-and-ranks-disagree", data("preference", "rank_ranking_and_ranks_disagree.jsonl", "rm"),
     "rank_ranking_and_ranks_disagree.jsonl:2: fields 'ranking' and 'ranks' disagree"),
    ("rank-huge-rank-rm", data("preference", "rank_huge_rank.jsonl", "rm"),
     "rank_huge_rank.jsonl:2: ranking[1] is 1e+30: a place must be at most 1,000,000,000"),
    ("rank-huge-rank-dpo", data("preference", "rank_huge_rank.jsonl", "dpo"),
     "rank_huge_rank.jsonl:2: ranking[1] is 1e+30: a place must be at most 1,000,000,000"),
    ("candidates-lone-surrogate", lambda ctx: ["label", str(BAD / "candidates_lone_surrogate.jsonl"), "--by", "gold",
                                               "--out", str(ctx.tmp / "r.jsonl")],
     "candidates_lone_surrogate.jsonl:1: field 'responses[1]' holds a lone surrogate \\ud800"),
    ("label-noise-nan", lambda ctx: ["label", str(ROOT / "tests/bad_inputs/rank_all_tied.jsonl"), "--by", "gold",
                                     "--noise", "nan", "--out", str(ctx.tmp / "r.jsonl")],
     "--noise must be a finite number, 0 or more, got nan"),
    ("label-noise-inf", lambda ctx: ["label", str(ROOT / "tests/bad_inputs/rank_all_tied.jsonl"), "--by", "gold",
                                     "--noise", "inf", "--out", str(ctx.tmp / "r.jsonl")],
     "--noise must be a finite number, 0 or more, got inf"),
    ("label-agreement-ranking-not-a-list", lambda ctx: ["label", "agreement",
                                                        str(BAD / "answers_ranking_not_a_list.jsonl")],
     "answers_ranking_not_a_list.jsonl:2: ranking must be a list of whole-number places, one per response"),
    ("label-serve-out-is-candidates", lambda ctx: ["label", "serve", str(BAD / "rank_all_tied.jsonl"), "--out",
                                                   str(BAD / "rank_all_tied.jsonl"), "--annotator", "alice"],
     "that is the candidates file; answers go to a file of their own"),
    ("sample-k-too-large", lambda ctx: ["sample", "base:" + str(ROOT / "data/tiny-base"), "--prompts",
                                        str(ROOT / "data/tiny/heldout_prompts.jsonl"), "-k", "100000000",
                                        "--out", str(ctx.tmp / "c.jsonl")], "--num-samples must be from 1 to 1024"),
    ("rank-not-labelled-yet", lambda ctx: ["rm", "--recipe", ctx.recipe, "--set",
                                           f"data.preference={ctx.tmp / 'runs' / 'tiny' / 'rankings.jsonl'}"],
     "which does not exist yet: `rlhf label` writes it"),
    ("sample-greedy-k", lambda ctx: ["sample", "base:" + str(ROOT / "data/tiny-base"), "--prompts",
                                     str(ROOT / "data/tiny/heldout_prompts.jsonl"), "-k", "3", "--temperature", "0",
                                     "--out", str(ctx.tmp / "c.jsonl")], "needs a temperature above 0"),
    ("label-bad-candidates", lambda ctx: ["label", str(BAD / "sft_missing_field.jsonl"), "--by", "gold", "--out",
                                          str(ctx.tmp / "r.jsonl")], "sft_missing_field.jsonl:1: field 'responses'"),
    ("label-serve-bad-annotator", lambda ctx: ["label", "serve", str(BAD / "rank_not_a_ranking.jsonl"), "--out",
                                               str(ctx.tmp / "r.jsonl"), "--annotator", "alice smith"],
     "--annotator must be 1-64 letters, digits or . _ - @, got 'alice smith'"),
    ("label-agreement-missing", lambda ctx: ["label", "agreement", str(ctx.tmp / "none.jsonl")], "file not found"),
    ("prompt-too-long", data("prompts", "prompts_too_long.jsonl", "ppo", *SMALL_PPO),
     "1 prompts within ppo.max_prompt_length=256, fewer than ppo.batch_size=2"),
    ("pref-all-too-long", recipe_set("rm", "rm.max_length=8"), "every pair is longer than rm.max_length=8"),
    ("length-past-positions", recipe_set("sft", "sft.max_length=4096"),
     "sft.max_length = 4096 is longer than the model's 512 positions"),
    ("prompt-no-field", data("prompts", "prompts_no_field.jsonl", "ppo", *SMALL_PPO), ":2: no prompt field"),
    ("recipe-unknown-key", recipe_set("sft", "sft.warmup=0.1"), "unknown key sft.warmup"),
    ("recipe-mistyped-key", recipe_set("rm", "rm.bacth_size=4"), "did you mean rm.batch_size"),
    ("recipe-unknown-section", recipe_set("sft", "stf.lr=0.1"), "did you mean sft"),
    ("recipe-wrong-type", recipe_set("sft", "sft.lr=fast"), "sft.lr must be a number"),
    ("recipe-negative-size", recipe_set("sft", "sft.batch_size=-1"), "sft.batch_size must be positive"),
    ("recipe-zero-size", recipe_set("ppo", "ppo.batch_size=0"), "ppo.batch_size must be positive"),
    ("recipe-batch-does-not-divide", recipe_set("ppo", "ppo.batch_size=64", "ppo.mini_batch_size=24"),
     "ppo.mini_batch_size (24) must divide ppo.batch_size (64)"),
    ("recipe-bad-yaml", lambda ctx: ["sft", "--recipe", str(BAD / "recipe_bad_yaml.yaml")],
     "recipe_bad_yaml.yaml:3: not valid YAML"),
    ("recipe-missing", lambda ctx: ["sft", "--recipe", str(ctx.tmp / "none.yaml")], "recipe file not found"),
    ("recipe-set-without-value", recipe_set("sft", "sft.lr"), "--set sft.lr: expected section.key=value"),
    ("checkpoint-missing", lambda ctx: ["ppo", "--recipe", ctx.recipe, "--reward", str(ctx.tmp / "nothing"),
                                        *SMALL_PPO],
     "nothing: not found (a reward model is a run directory, a model directory or a hub id)"),
    ("checkpoint-wrong-stage-policy", lambda ctx: ["ppo", "--recipe", ctx.recipe, "--policy", str(ctx.runs / "rm"),
                                                   *SMALL_PPO], "is a 'rm' run, not a policy"),
    ("checkpoint-wrong-stage-reward", lambda ctx: ["rm", "score", "--reward", str(ctx.runs / "sft"), "--data",
                                                   str(ROOT / "data/tiny/heldout_preference.jsonl")],
     "not a reward model"),
    ("checkpoint-unfinished", unfinished_run, "the run did not finish"),
    ("adapter-for-another-base", another_base, "cannot be loaded onto base"),
    ("truncated-safetensors", truncated_weights, "adapter_model.safetensors: damaged weights file"),
    ("output-already-finished", finished_output, "--overwrite"),
    ("output-not-writable", parent_is_a_file, "cannot write the run directory"),
    ("resume-nothing", recipe_set("sft", "sft.max_steps=1"), None),
    ("eval-nothing-to-compare", recipe_set("eval", "eval.policies=[]", "eval.icl_shots=0"), "nothing to evaluate"),
    ("scorer-unknown", recipe_set("ppo", "ppo.reward={gld: 1.0}"),
     "ppo.reward: unknown scorer 'gld' (did you mean 'gold'?)"),
    ("scorer-file-missing", recipe_set("eval", "eval.scorers=['nowhere/checks.py:exact']"),
     "eval.scorers: scorer file nowhere/checks.py not found"),
    ("scorer-not-a-function", recipe_set("eval", "eval.scorers=['rlhf.tiny.world:KINDS']"),
     "scorer 'rlhf.tiny.world:KINDS' is a tuple, not callable"),
    ("reward-all-zero", recipe_set("ppo", "ppo.reward={reward_model: 0}"), "ppo.reward needs a term"),
    ("reward-model-not-used", lambda ctx: ["ppo", "--recipe", ctx.recipe, "--set", "ppo.reward={gold: 1.0}",
                                           "--reward", str(ctx.tmp / "rm")], "ppo.reward has no reward_model term"),
]


NEEDS_RUNS = {"prompt-too-long", "prompt-no-field", "checkpoint-missing", "checkpoint-wrong-stage-policy",
              "checkpoint-wrong-stage-reward", "checkpoint-unfinished", "adapter-for-another-base",
              "truncated-safetensors", "rank-huge-rank-dpo"}
"""cases that need finished SFT and RM runs (the PPO stage checks its parents before it reads its prompts)"""
REAL_PROCESS = {"sft-invalid-json", "recipe-unknown-key", "checkpoint-unfinished"}
"""cases also run as a real ``rlhf`` process: a data file, a recipe and a checkpoint error"""


class Ctx:
    def __init__(self, tmp: Path, recipe: Path, runs: Path | None):
        self.tmp, self.runs = tmp, runs
        self.recipe = str(recipe)
        self.out = tmp / "out"

    def copy_run(self, stage: str, name: str) -> Path:
        dest = self.tmp / name
        shutil.copytree(self.runs / stage, dest)
        return dest


def command(case: str, build, ctx: Ctx) -> list[str]:
    argv = build(ctx)
    if case == "resume-nothing":
        argv = argv + ["--resume"]
    if argv[0] in ("sft", "rm", "ppo", "dpo", "eval") and "score" not in argv:
        argv += ["--out", str(ctx.out)]
    return argv


def in_process(argv: list[str]) -> tuple[int, str]:
    """``rlhf ARGV`` through click in this process: (exit code, stderr)."""
    from rlhf.cli import cli

    result = CliRunner().invoke(cli, argv)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        stderr += "Traceback (in-process)\n" + "".join(traceback.format_exception(result.exception))
    return result.exit_code, stderr


def check_refusal(case: str, expected: str | None, code: int, stderr: str, ctx: Ctx) -> None:
    expected = expected or "nothing to resume"
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0], lines[0]
    if case != "output-already-finished":
        assert not (ctx.tmp / "out" / "manifest.json").exists(), "nothing that looks like a finished output"
    assert not list(ctx.tmp.glob(".out.*")), "no staging or work directory left behind"


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
    assert NEEDS_RUNS | REAL_PROCESS <= {c[0] for c in CASES}


FAST = [c for c in CASES if c[0] not in NEEDS_RUNS]
WITH_RUNS = [c for c in CASES if c[0] in NEEDS_RUNS]


@pytest.mark.fast
@pytest.mark.parametrize("case,build,expected", FAST, ids=[c[0] for c in FAST])
def test_bad_input_is_refused_cleanly(case, build, expected, tmp_path):
    ctx = Ctx(tmp_path, write_recipe(tmp_path / "tiny.yaml", run_dir=str(tmp_path / "runs")), None)
    check_refusal(case, expected, *in_process(command(case, build, ctx)), ctx)


@pytest.mark.parametrize("case,build,expected", WITH_RUNS, ids=[c[0] for c in WITH_RUNS])
def test_bad_parent_run_is_refused_cleanly(case, build, expected, tmp_path, parents):
    ctx = Ctx(tmp_path, *parents)
    check_refusal(case, expected, *in_process(command(case, build, ctx)), ctx)


@pytest.mark.parametrize("case", sorted(REAL_PROCESS))
def test_the_rlhf_process_exits_2_with_one_line(case, tmp_path, parents):
    _, build, expected = next(c for c in CASES if c[0] == case)
    ctx = Ctx(tmp_path, *parents)
    proc = run_cli(*command(case, build, ctx), check=False)
    check_refusal(case, expected, proc.returncode, proc.stderr, ctx)
