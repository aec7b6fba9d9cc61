"""The InstructGPT loop through the command line: `rlhf sample -k K` writes candidates (deterministic for a seed,
resumable, never half-written), `rlhf label` ranks them with a scorer or a reward model, the reward model trains on
the rankings (grouped per prompt, or shuffled as pairs) and PPO runs against it."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import ROOT, ran, refused, run_cli
from rlhf.feedback import ranking, rewards
from rlhf.models import modeling
from rlhf.text import formats
from rlhf.text.formats import ranks_from_scores
from rlhf.cli import cli
from stages import rm as rm_stage
from stages import sample as sample_stage

PROMPTS = str(ROOT / "data/tiny/prompts.jsonl")
HELDOUT = str(ROOT / "data/tiny/heldout_prompts.jsonl")


def rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def invoke(*args, code=0):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, f"rlhf {' '.join(args)} exited {result.exit_code}\n{result.output}"
    return result.output


@pytest.fixture(scope="module")
def candidates(parents, tmp_path_factory):
    """K = 4 candidates of the parents' SFT model for 40 training and 16 held-out prompts, through the CLI."""
    _, runs = parents
    d = tmp_path_factory.mktemp("candidates")
    for name, prompts, n, seed in (("train", PROMPTS, 40, "0"), ("heldout", HELDOUT, 16, "1")):
        ran("sample", str(runs / "sft"), "--prompts", prompts, "-k", "4", "--limit", str(n),
            "--max-new-tokens", "24", "--seed", seed, "--out", str(d / f"{name}.jsonl"))
    return d


def test_sample_writes_k_candidates_with_their_provenance(parents, candidates):
    _, runs = parents
    got = rows(candidates / "train.jsonl")
    assert len(got) == 40 and not (candidates / "train.jsonl.partial").exists()
    for row in got:
        assert len(row["responses"]) == 4 and len(row["eos"]) == 4
        assert row["duplicate_of"] == formats.duplicates(row["responses"])
        assert (row["run"], row["temperature"], row["seed"], row["max_new_tokens"], row["num_samples"]) == (
            str(runs / "sft"), 1.0, 0, 24, 4)  # the temperature is the run's ppo.temperature
    assert any(len(set(r["responses"])) > 1 for r in got)  # sampled, not greedy
    assert formats.load(str(candidates / "train.jsonl"), "candidates").rows[0]["prompt"][-1]["role"] == "user"


def test_duplicates_point_at_the_first_copy():
    assert formats.duplicates(["a", "b", "a", "a", "c", "b"]) == [None, None, 0, 0, None, 1]


def test_sample_is_deterministic_resumable_and_never_half_written(parents, tmp_path, monkeypatch):
    _, runs = parents
    monkeypatch.setattr(sample_stage, "CHUNK", 2)
    args = ["sample", str(runs / "sft"), "--prompts", PROMPTS, "-k", "2", "--limit", "5", "--max-new-tokens", "8"]
    invoke(*args, "--out", str(tmp_path / "a.jsonl"))
    invoke(*args, "--out", str(tmp_path / "b.jsonl"))
    whole = (tmp_path / "a.jsonl").read_text()
    assert (tmp_path / "b.jsonl").read_text() == whole  # the same seed, the same file
    invoke(*args, "--seed", "7", "--out", str(tmp_path / "c.jsonl"))
    assert (tmp_path / "c.jsonl").read_text() != whole

    # an interrupted run: the first chunk done, the second cut inside its first row
    lines = whole.splitlines(keepends=True)
    partial = tmp_path / "d.jsonl.partial"
    partial.write_text(lines[0] + lines[1] + lines[2] + lines[3][:20])
    out = invoke(*args, "--out", str(tmp_path / "d.jsonl"), code=2)
    assert "--resume continues it" in out and not (tmp_path / "d.jsonl").exists()
    invoke(*args, "--out", str(tmp_path / "d.jsonl"), "--resume")
    assert (tmp_path / "d.jsonl").read_text() == whole and not partial.exists()

    # an existing output is not replaced; K > 1 needs sampling
    out = invoke(*args, "--out", str(tmp_path / "a.jsonl"), code=2)
    assert "exists (--overwrite replaces it)" in out
    assert "greedy responses are all the same" in invoke(*args, "--temperature", "0", code=2)


def test_sample_other_settings_in_a_partial_file_are_refused(parents, tmp_path):
    _, runs = parents
    (tmp_path / "x.jsonl.partial").write_text(json.dumps({"run": "elsewhere", "temperature": 1.0, "seed": 0,
                                                          "max_new_tokens": 8, "num_samples": 2}) + "\n")
    out = invoke("sample", str(runs / "sft"), "--prompts", PROMPTS, "-k", "2", "--limit", "2",
                 "--max-new-tokens", "8", "--out", str(tmp_path / "x.jsonl"), "--resume", code=2)
    assert "x.jsonl.partial:1: was sampled with other settings (run)" in out


def test_sample_resume_checks_every_kept_row_against_its_prompt(parents, tmp_path, monkeypatch):
    _, runs = parents
    monkeypatch.setattr(sample_stage, "CHUNK", 2)
    args = ["sample", str(runs / "sft"), "--prompts", PROMPTS, "-k", "2", "--max-new-tokens", "8"]
    invoke(*args, "--limit", "4", "--out", str(tmp_path / "a.jsonl"))
    lines = (tmp_path / "a.jsonl").read_text().splitlines(keepends=True)
    tampered = json.loads(lines[1])
    tampered["responses"] = []
    partial = tmp_path / "e.jsonl.partial"
    for kept, extra, message in [
        (lines[:2], ["--prompts", HELDOUT, "--limit", "4"], "e.jsonl.partial:1: is not prompt 1 of the prompt file"),
        (lines, ["--limit", "2"], "e.jsonl.partial:3: more rows than the 2 prompts of this run"),
        ([lines[1], lines[0]], ["--limit", "4"], "e.jsonl.partial:1: is not prompt 1 of the prompt file"),
        ([lines[0], json.dumps(tampered) + "\n"], ["--limit", "4"], "e.jsonl.partial:2: needs 2 responses"),
        ([lines[0], "{not json\n", lines[1]], ["--limit", "4"], "e.jsonl.partial:2: not a JSON row"),
    ]:
        partial.write_text("".join(kept))
        out = invoke(*args, *extra, "--out", str(tmp_path / "e.jsonl"), "--resume", code=2)
        assert message in out, out
        assert partial.read_text() == "".join(kept) and not (tmp_path / "e.jsonl").exists()  # nothing touched

    # a scorer that fails on the first chunk leaves no partial file in the way of the fixed rerun
    broken = tmp_path / "broken.py"
    broken.write_text("def score(prompts, responses):\n    raise RuntimeError('bug')\n")
    out = invoke(*args, "--limit", "4", "--scorer", f"{broken}:score", "--out", str(tmp_path / "f.jsonl"), code=2)
    assert "RuntimeError: bug" in out and not (tmp_path / "f.jsonl.partial").exists()
    invoke(*args, "--limit", "4", "--out", str(tmp_path / "f.jsonl"))
    assert (tmp_path / "f.jsonl").read_text() == "".join(lines)


def test_ranks_from_scores():
    assert ranks_from_scores([0.5, 1.0, 0.5, 0.0]) == [1, 0, 1, 2]
    assert ranks_from_scores([None, 2.0, 3.0, None]) == [None, 1, 0, None]


def test_label_by_gold_a_reward_model_and_with_noise(parents, candidates, tmp_path):
    _, runs = parents
    cands = rows(candidates / "train.jsonl")
    out = json.loads(ran("label", str(candidates / "train.jsonl"), "--by", "gold", "--out",
                         str(tmp_path / "gold.jsonl")).split(" -> ")[0])
    labelled = rows(tmp_path / "gold.jsonl")
    assert out["written"] == len(labelled) and out["written"] + out["all_tied"] == len(cands) > out["written"] > 0
    from rlhf.tiny.world import gold_scores

    for row in labelled:
        prompt = formats.prompt_only(row)
        assert row["label_scores"] == gold_scores([prompt] * len(row["responses"]), row["responses"])
        assert row["ranking"] == ranks_from_scores(row["label_scores"])
        assert row["label"] == {"by": "gold", "noise": 0.0, "seed": 0} and "run" in row  # provenance carried
    # the rankings are the reward model's data, and the comparisons are what label counted
    loaded = formats.load(str(tmp_path / "gold.jsonl"), "ranking")
    assert loaded.formats == ["responses"]
    assert sum(len(ranking.ranking_pairs(r["ranks"])) for r in loaded.rows) == out["comparisons"]

    # a reward model as the labeller (AI feedback): every prompt gets a ranking from its real-valued scores
    ran("label", str(candidates / "train.jsonl"), "--by", str(runs / "rm"), "--out", str(tmp_path / "rm.jsonl"))
    by_rm = rows(tmp_path / "rm.jsonl")
    model, tok = modeling.load_reward(runs / "rm")
    first = by_rm[0]
    direct = rewards.score_conversations(model, tok, [formats.prompt_only(first) + [
        {"role": "assistant", "content": r}] for r in first["responses"]])
    torch.testing.assert_close(torch.tensor(first["label_scores"]), direct, rtol=0, atol=1e-4)

    # noise: a seeded simulated annotator who sometimes disagrees
    for seed, name in (("0", "n1"), ("0", "n2"), ("5", "n3")):
        ran("label", str(candidates / "train.jsonl"), "--by", "gold", "--noise", "0.5", "--seed", seed,
            "--out", str(tmp_path / f"{name}.jsonl"))
    n1, n2, n3 = (rows(tmp_path / f"{n}.jsonl") for n in ("n1", "n2", "n3"))
    assert n1 == n2 and n1 != n3
    assert any(r["ranking"] != ranks_from_scores(r["label_scores"]) for r in n1)


def test_label_errors(parents, candidates, tmp_path):
    (tmp_path / "never.py").write_text("def none(prompts, responses):\n    return [None] * len(responses)\n")
    target = tmp_path / "out.jsonl"
    refused("label", str(candidates / "train.jsonl"), "--by", f"{tmp_path / 'never.py'}:none",
            "--out", str(target), expect="no prompt could be ranked (40 where")
    assert not target.exists() and not (tmp_path / "out.jsonl.tmp").exists()
    refused("label", str(candidates / "train.jsonl"), "--by", "nonsense", "--out", str(target), expect="--by")
    target.write_text("keep me\n")
    proc = run_cli("label", str(candidates / "train.jsonl"), "--by", "gold", "--out", str(target), check=False)
    assert proc.returncode == 2 and target.read_text() == "keep me\n"


@pytest.fixture(scope="module")
def ranked(parents, candidates, tmp_path_factory):
    """Gold rankings of the candidates, a reward model trained on them grouped (InstructGPT) and one shuffled."""
    recipe, runs = parents
    d = tmp_path_factory.mktemp("ranked")
    for name in ("train", "heldout"):
        ran("label", str(candidates / f"{name}.jsonl"), "--by", "gold", "--out", str(d / f"{name}.jsonl"))
    common = ["--recipe", str(recipe), "--set", f"data.preference={d / 'train.jsonl'}",
              "--set", f"data.eval_preference={d / 'heldout.jsonl'}", "--set", "rm.max_steps=6",
              "--set", "rm.batch_size=4", "--set", "rm.stats_samples=0", "--set", "rm.eval_every=3",
              "--set", "rm.logging_every=2"]
    ran("rm", *common, "--out", str(d / "rm-grouped"))
    ran("rm", *common, "--set", "rm.comparisons=shuffled", "--out", str(d / "rm-shuffled"))
    return d


def test_reward_model_trains_on_rankings_grouped_and_shuffled(ranked):
    train = formats.load(str(ranked / "train.jsonl"), "ranking").rows
    comparisons = sum(len(ranking.ranking_pairs(r["ranks"])) for r in train)
    grouped = json.loads((ranked / "rm-grouped" / "manifest.json").read_text())
    shuffled = json.loads((ranked / "rm-shuffled" / "manifest.json").read_text())
    assert (grouped["data"]["loss"], grouped["data"]["unit"], grouped["data"]["train_rows"]) == (
        "instructgpt_ranking", "rankings", len(train))
    assert (shuffled["data"]["loss"], shuffled["data"]["unit"], shuffled["data"]["train_rows"]) == (
        "bradley_terry", "pairs", comparisons)
    for m in (grouped, shuffled):  # held out as rankings either way: accuracy over all comparisons, and top-1
        assert 0 <= m["metrics"]["eval_accuracy"] <= 1 and 0 <= m["metrics"]["eval_top1_accuracy"] <= 1
        assert m["metrics"]["eval_rankings"] == len(formats.load(str(ranked / "heldout.jsonl"), "ranking").rows)
    logged = [json.loads(line) for line in open(ranked / "rm-grouped" / "metrics.jsonl")]
    assert any("train/top1_accuracy" in r for r in logged) and any("eval/loss" in r for r in logged)

    # rm score reads rankings too, and agrees with the stage's own held-out measurement
    out = json.loads(run_cli("rm", "score", "--reward", str(ranked / "rm-grouped"), "--data",
                             str(ranked / "heldout.jsonl")).stdout)
    assert out["accuracy"] == pytest.approx(grouped["metrics"]["eval_accuracy"], abs=1e-6)
    assert out["top1_accuracy"] == pytest.approx(grouped["metrics"]["eval_top1_accuracy"], abs=1e-6)


def test_the_trainer_loss_is_the_instructgpt_loss(ranked):
    """The grouped trainer's batch (RankingCollator) through the reward model gives ranking_loss of the scores PPO
    reads: the collator pads on the right and the forward pools where rewards.score_sequences reads."""
    model, tok = modeling.load_reward(ranked / "rm-grouped")
    rankings = formats.load(str(ranked / "heldout.jsonl"), "ranking").rows[:3]
    encoded = rm_stage.encode_rankings(tok, rankings, 160)
    batch = rm_stage.RankingCollator(tok.pad_token_id)(encoded.rows)
    assert batch["input_ids"].shape[0] == sum(len(r["ranks"]) for r in encoded.rows)
    with torch.no_grad():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    read = rm_stage.ranking_scores(model, tok, encoded)
    torch.testing.assert_close(scores, read, rtol=0, atol=1e-4)
    assert batch["ranks"] == [r["ranks"] for r in encoded.rows]


def test_ppo_runs_against_the_ranking_trained_reward_model(parents, ranked, tmp_path):
    recipe, runs = parents
    proc = run_cli("ppo", "--recipe", str(recipe), "--reward", str(ranked / "rm-grouped"), "--out",
                   str(tmp_path / "ppo"), "--set", "ppo.max_steps=2", "--set", "ppo.batch_size=8",
                   "--set", "ppo.mini_batch_size=8", "--set", "ppo.micro_batch_size=8",
                   "--set", "ppo.max_new_tokens=16", "--set", "ppo.eval_every=0")
    manifest = json.loads((tmp_path / "ppo" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["parents"]["rm"].endswith("rm-grouped")
    assert "ppo: 2 steps" in proc.stdout


def test_candidates_from_several_policies_carry_their_policy_through_labels_and_the_reward_model(parents, tmp_path):
    """`rlhf sample SFT base:BASE -k 2`: each policy gives K responses to every prompt, tagged with the policy; the
    rankings keep the tags and the reward model trains on them. One policy's keys are those of a run of its own
    for the first prompt (key (i * P + p) * K + j), so mixing changes no policy's distribution."""
    recipe, runs = parents
    base = f"base:{ROOT / 'data' / 'tiny-base'}"
    out, alone = tmp_path / "mixed.jsonl", tmp_path / "alone.jsonl"
    common = ["--prompts", PROMPTS, "-k", "2", "--limit", "6", "--max-new-tokens", "12"]
    demos = ["--icl-shots", "3", "--demos", str(ROOT / "data/tiny/sft.jsonl")]  # the base answers after examples
    ran("sample", str(runs / "sft"), base, *common, *demos, "--out", str(out))
    ran("sample", str(runs / "sft"), *common, "--out", str(alone))
    ran("sample", str(runs / "sft"), base, *common, "--out", str(tmp_path / "bare.jsonl"))
    mixed = rows(out)
    assert len(mixed) == 6
    for row in mixed:
        assert row["run"] == [str(runs / "sft"), base] and row["num_samples"] == 2 and len(row["responses"]) == 4
        assert row["icl_shots"] == 3 and isinstance(row["prompt"], str)  # the prompt alone, not the examples
        assert row["policies"] == [str(runs / "sft")] * 2 + [base] * 2 and len(row["eos"]) == 4
        assert row["duplicate_of"] == formats.duplicates(row["responses"])
    assert mixed[0]["responses"][:2] == rows(alone)[0]["responses"]  # keys 0 and 1: the same draws
    bare = rows(tmp_path / "bare.jsonl")
    assert [r["responses"][:2] for r in bare] == [r["responses"][:2] for r in mixed]  # the SFT policy's, unchanged
    assert [r["responses"][2:] for r in bare] != [r["responses"][2:] for r in mixed]  # the examples change the base
    assert any(r["responses"][:2] != r["responses"][2:] for r in mixed)  # two policies, two kinds of answer
    # a partial file of a single-policy run is not continued as a mixed one
    (tmp_path / "x.jsonl.partial").write_text((alone.read_text().splitlines()[0]) + "\n")
    refusal = invoke("sample", str(runs / "sft"), base, *common, "--out", str(tmp_path / "x.jsonl"), "--resume",
                     code=2)
    assert "was sampled with other settings (run)" in refusal
    assert "--icl-shots gives demonstrations to base: policies" in invoke(
        "sample", str(runs / "sft"), *common, *demos, "--out", str(tmp_path / "y.jsonl"), code=2)

    ran("label", str(out), "--by", "gold", "--out", str(tmp_path / "rankings.jsonl"))
    ranked = rows(tmp_path / "rankings.jsonl")
    assert ranked and all(r["policies"] == mixed[0]["policies"] and len(r["ranking"]) == 4 for r in ranked)
    ran("rm", "--recipe", str(recipe), "--set", f"data.preference={tmp_path / 'rankings.jsonl'}",
        "--set", "data.eval_preference=null", "--set", "rm.eval_fraction=0", "--set", "rm.max_steps=2",
        "--set", "rm.batch_size=2", "--set", "rm.stats_samples=0", "--out", str(tmp_path / "rm"))
    m = json.loads((tmp_path / "rm" / "manifest.json").read_text())
    assert m["data"]["unit"] == "rankings" and m["data"]["train_rows"] == len(ranked)
    kept = formats.load(str(tmp_path / "rankings.jsonl"), "ranking").rows
    assert m["data"]["policies"] == {p: sum(r["policies"].count(p) for r in kept) for p in (str(runs / "sft"), base)}
    info = invoke("info", str(tmp_path / "rm"))  # the policies sampled come before the reward model in its lineage
    assert f"{runs / 'sft'}  [candidates of]" in info and info.index("[candidates of]") < info.index("[rm]")
    assert "trained on responses of: " in (tmp_path / "rm" / "README.md").read_text()


def test_one_run_under_two_spellings_is_one_policy_and_a_resume_keeps_its_demonstrations(parents, tmp_path):
    """`runs/sft` and `runs/sft/` name one policy: sampling both is refused as a policy named twice, rows record the
    plain spelling, and a reward model's `data.policies` counts rankings that spell it either way as one. A
    partial file sampled after one demonstrations file is not continued with another (it kept the old rows)."""
    _, runs = parents
    common = ["--prompts", PROMPTS, "-k", "2", "--limit", "2", "--max-new-tokens", "8"]
    assert "a policy is named twice" in invoke("sample", str(runs / "sft"), f"{runs / 'sft'}/", *common, code=2)
    ran("sample", f"{runs / 'sft'}/", *common, "--out", str(tmp_path / "one.jsonl"))
    assert {r["run"] for r in rows(tmp_path / "one.jsonl")} == {str(runs / "sft")}
    assert rm_stage.policies_of([{"policies": ["runs/sft", "runs/sft/"]}, {"policies": ["./runs/sft"]}]) == {
        "policies": {"runs/sft": 3}}

    base = f"base:{ROOT / 'data' / 'tiny-base'}"
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(line for line in open(ROOT / "data/tiny/sft.jsonl")))
    sampled = ["sample", base, *common, "--icl-shots", "2", "--demos"]
    ran(*sampled, str(demos), "--out", str(tmp_path / "a.jsonl"))
    (tmp_path / "b.jsonl.partial").write_text(open(tmp_path / "a.jsonl").readline())
    other = tmp_path / "other.jsonl"
    other.write_text("".join(list(open(ROOT / "data/tiny/sft.jsonl"))[100:200]))
    refusal = invoke(*sampled, str(other), "--out", str(tmp_path / "b.jsonl"), "--resume", code=2)
    assert "was sampled with other settings (demos_sha256)" in refusal
    invoke(*sampled, str(demos), "--out", str(tmp_path / "b.jsonl"), "--resume")
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()


@pytest.mark.parametrize("round_,expect", [
    ("0", "ROUND is the number of the round to run, 2 or more (round 1 is make sft sample label rm ppo eval"),
    ("1", "got '1'"), ("abc", "got 'abc'"),
    ("3", "round 3 needs the PPO run of the round before it at nowhere/round2/ppo (make round ROUND=2"),
])
def test_make_round_says_what_a_round_number_is_and_what_must_exist_first(round_, expect):
    """`make round` with ROUND=0, 1 or abc talked about directories that are not rounds (and `expr` errors)."""
    import subprocess

    proc = subprocess.run(["make", "-s", "round-check", f"ROUND={round_}", "RANKED=nowhere"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("make round: ") and expect in proc.stderr, proc.stderr
    assert "expr:" not in proc.stderr and "seq:" not in proc.stderr
