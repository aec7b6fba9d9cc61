"""Many processes: two real gloo processes on this CPU give the same weights as one process with twice the batch,
for SFT, RM (both through TRL's trainers) and PPO (our own loop); two launchers standing for two machines give
what two processes on one machine give; only one run directory is written; the shipped accelerate configs parse
the way accelerate parses them; the FSDP config shards SFT, RM and DPO over CPU processes (FSDP2 over gloo) with
the same result. (DeepSpeed runs only on GPUs.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FLAT_WHEN_EVEN, ROOT, ran, refused, run_cli, write_recipe
from rlhf.ppo import ppo_math
from rlhf.scale import distributed, launch
from rlhf.engine.rollout import episode_keys, gumbel_max, hash_uniform

CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
# Two processes sum their gradients in another order than one process does; fp32 rounding stays far below this
# (measured: 2e-6 for SFT, 1e-5 for RM, 1e-7 for PPO; the weights themselves are ~0.06-0.2)
ATOL = 1e-4


def _max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a), load_file(b)
    assert set(x) == set(y)
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def _only_run(parent: Path, name: str) -> None:
    """The parent holds the one finished run directory and nothing else (no staging or work directories)."""
    assert sorted(p.name for p in parent.iterdir()) == [name]


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------------

def test_launch_command_is_an_argument_list_without_our_options():
    argv = ["sft", "--recipe", "r.yaml", "--num-processes", "2", "--set", "sft.lr=1e-4", "--accelerate-config=x"]
    inner = launch.strip_launch_options(argv)
    assert inner == ["sft", "--recipe", "r.yaml", "--set", "sft.lr=1e-4"]
    cmd = launch.launch_command(inner, 2, None)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    if not torch.cuda.is_available():  # --cpu would start one process; --multi_gpu + ACCELERATE_USE_CPU starts two
        assert "--multi_gpu" in cmd and "--cpu" not in cmd
    assert cmd[-7:] == ["-m", "rlhf.cli", *inner]


def test_a_missing_accelerate_config_is_a_one_line_error(tiny_recipe):
    proc = run_cli("sft", "--recipe", str(tiny_recipe), "--accelerate-config", "nope.yaml", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --accelerate-config: nope.yaml: no such file"


@pytest.mark.parametrize("content,expect", [
    ("", "an accelerate config is a mapping of settings"),
    ("- a\n- b\n", "an accelerate config is a mapping of settings (distributed_type, num_processes, ...), not list"),
    ("distributed_type: FSDP\nnum_processes: [2\n", "bad.yaml:3: not valid YAML"),
    ("distributed_type: SUPERFAST\n", "distributed_type 'SUPERFAST' is not one accelerate knows"),
    ("distributed_type: MULTI_CPU\nnum_processes: many\n", "num_processes must be a whole number of at least 1"),
    ("distributed_type: FSDP\nfsdp_config: 3\n", "fsdp_config must be a mapping, got 3"),
])
def test_a_bad_accelerate_config_is_a_one_line_error_naming_it(tiny_recipe, tmp_path, content, expect):
    """Empty, a list, malformed YAML, an unknown distributed type, values of the wrong type: each was a traceback
    from accelerate's launcher."""
    (tmp_path / "bad.yaml").write_text(content)
    line = refused("sft", "--recipe", str(tiny_recipe), "--accelerate-config", str(tmp_path / "bad.yaml"),
                   expect=expect)
    assert str(tmp_path / "bad.yaml") in line


def test_a_launched_run_stops_on_bad_input_in_one_line(tiny_recipe, tmp_path):
    """Every process finds the same mistake: the launching command prints it once and exits 2, without the
    launcher's traceback of the failed processes."""
    proc = run_cli("ppo", "--recipe", str(tiny_recipe), "--policy", str(tmp_path / "nope"), "--num-processes", "2",
                   "--out", str(tmp_path / "ppo"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert [x for x in proc.stderr.splitlines() if "error" in x.lower()] == [
        f"error: {tmp_path / 'nope'}: not a run directory (no manifest.json)"], proc.stderr


def test_sampling_keys_give_the_same_draws_in_any_batch():
    keys = episode_keys(7, 3, torch.arange(8))
    assert len(set(keys.tolist())) == 8
    whole = hash_uniform(keys, 5, 50)
    assert torch.equal(whole[2:4], hash_uniform(keys[2:4], 5, 50))  # a slice draws what the whole batch drew
    assert not torch.equal(whole, hash_uniform(keys, 6, 50))  # another position draws anew
    assert not torch.equal(keys, episode_keys(7, 4, torch.arange(8)))  # and so does another step


def test_gumbel_max_samples_the_softmax():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    n = 100_000
    keys = episode_keys(0, 1, torch.arange(n))
    counts = sum(torch.bincount(gumbel_max(probs.log().expand(n, 5), keys, position), minlength=5)
                 for position in range(2))
    expected = counts.sum() * probs
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 18.5  # chi-square, 4 degrees of freedom: p = 0.001
    # scores at temperature 2 (logits / 2) flatten the distribution as softmax(logits / 2) does
    freq = torch.bincount(gumbel_max(probs.log().expand(n, 5) / 2, episode_keys(1, 1, torch.arange(n)), 0),
                          minlength=5) / n
    assert (freq - torch.softmax(probs.log() / 2, 0)).abs().max() < 0.01


def test_whitening_in_one_process_is_plain_masked_whitening():
    x = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert torch.allclose(ppo_math.masked_whiten(x, mask, total=distributed.all_sum), ppo_math.masked_whiten(x, mask))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_shipped_accelerate_configs_parse_as_accelerate_parses_them(config):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    cluster = load_config_from_file(str(config))  # unknown keys are an error here
    args, defaults, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(config), "x.py"]))
    assert args.num_processes == cluster.num_processes >= 1
    if cluster.distributed_type.value == "DEEPSPEED":
        from unittest import mock

        from accelerate.utils import DeepSpeedPlugin
        from accelerate.utils.launch import prepare_deepspeed_cmd_env

        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        with mock.patch.dict(os.environ, env):
            ds = DeepSpeedPlugin().deepspeed_config  # the DeepSpeed JSON accelerate would hand to deepspeed
        zero = ds["zero_optimization"]
        assert zero["stage"] == defaults.deepspeed_config["zero_stage"] in (2, 3)
        offload = defaults.deepspeed_config["offload_param_device"]
        assert zero["offload_param"]["device"] == offload
        assert ("offload" in config.stem) == (offload == "cpu")
    if cluster.distributed_type.value == "FSDP":
        assert cluster.fsdp_config["fsdp_reshard_after_forward"] is True  # full shard
    if config.stem == "two_nodes":
        assert cluster.num_machines == 2 and cluster.main_process_ip


# ---------------------------------------------------------------------------------------------------------------
# Two processes through the real CLI
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("distributed")
    return write_recipe(d / "tiny.yaml", run_dir=str(d / "runs"))


# with the held-out evaluation on (as the recipe has it): under FSDP2 the trainer's evaluation left the root's
# weights gathered, and the adapter was not saved
SFT = ("--set", "sft.max_steps=3", "--set", "sft.eval_fraction=0.02")


@pytest.fixture(scope="module")
def sft_single(recipe):
    out = recipe.parent / "sft1" / "sft"
    ran("sft", "--recipe", str(recipe), *SFT, "--set", "sft.batch_size=8", "--out", str(out))  # in this process
    return out


def test_sft_on_two_processes_matches_one(recipe, sft_single):
    out = recipe.parent / "sft2" / "sft"
    proc = run_cli("sft", "--recipe", str(recipe), *SFT, "--set", "sft.batch_size=4", "--num-processes", "2",
                   "--out", str(out))
    m = _manifest(out)
    assert m["world_size"] == 2 and m["distributed"] == "MULTI_CPU"  # really two processes
    assert proc.stdout.count("sft: 3 steps") == 1  # the result is printed once
    _only_run(out.parent, "sft")
    assert _max_diff(out / "adapter_model.safetensors", sft_single / "adapter_model.safetensors") < ATOL
    # the reported loss is the mean over both processes: the loss of the whole batch
    assert m["metrics"]["train_loss"] == pytest.approx(_manifest(sft_single)["metrics"]["train_loss"], rel=1e-5)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(
        (sft_single / "metrics.jsonl").read_text().splitlines())


def _fsdp_config(tmp_path: Path) -> Path:
    """The shipped FSDP config in fp32 (its bf16 autocast would differ from the one-process fp32 run by ~5e-3)."""
    config = tmp_path / "fsdp_cpu.yaml"
    config.write_text((ROOT / "recipes" / "accelerate" / "fsdp.yaml").read_text()
                      .replace("mixed_precision: bf16", "mixed_precision: 'no'"))
    return config


def _halves(run: Path, trained_only: bool = False) -> None:
    """Each of the two processes held half of the parameters (and of the trained ones) while it trained, and
    together all of them: every weight is split along its first dimension, except a score head's single row,
    which one process holds whole."""
    shards = _manifest(run)["shards"]
    for held, whole in ((shards["held_by_process"], shards["parameters"]),
                        (shards["trained_held_by_process"], shards["trained"])):
        assert sum(held) == whole and all(abs(x - whole / 2) <= 0.001 * whole for x in held), (held, whole)
    assert trained_only or shards["trained"] == shards["parameters"]


def test_fsdp2_shards_sft_on_cpu_processes_and_equals_one_process(recipe, sft_single, tmp_path):
    """The shipped FSDP config on two CPU processes really shards (FSDP2 on a gloo device mesh through accelerate's
    own FSDP2 code: ``distributed.shard_on_cpu``): each process holds half of every weight, LoRA's and the
    frozen base's; the adapter, saved after the held-out evaluation, equals one process's; and full fine-tuning
    shards every weight and equals one process's too."""
    out = recipe.parent / "sft_fsdp" / "sft"
    proc = run_cli("sft", "--recipe", str(recipe), *SFT, "--set", "sft.batch_size=4", "--accelerate-config",
                   str(_fsdp_config(tmp_path)), "--num-processes", "2", "--out", str(out))
    assert "FSDP2 over 2 CPU processes" in proc.stderr
    m = _manifest(out)
    assert m["world_size"] == 2 and m["distributed"] == "FSDP"
    _halves(out, trained_only=True)
    _only_run(out.parent, "sft")
    assert _max_diff(out / "adapter_model.safetensors", sft_single / "adapter_model.safetensors") < ATOL

    full = ("--set", "adapter.method=full", "--set", "sft.lr=1e-4")
    one, two = tmp_path / "full1" / "sft", tmp_path / "full2" / "sft"
    ran("sft", "--recipe", str(recipe), *SFT, *full, "--set", "sft.batch_size=8", "--out", str(one))
    run_cli("sft", "--recipe", str(recipe), *SFT, *full, "--set", "sft.batch_size=4", "--accelerate-config",
            str(_fsdp_config(tmp_path)), "--num-processes", "2", "--out", str(two))
    _halves(two)
    assert _max_diff(two / "model.safetensors", one / "model.safetensors") < ATOL  # the tied head saved once


RM = ("--set", "rm.max_steps=3", "--set", "rm.stats_samples=64")


@pytest.mark.parametrize("layout", ["data-parallel", "fsdp2"])
def test_rm_on_two_processes_matches_one(recipe, tmp_path, layout):
    """Data parallel, and sharded with the shipped FSDP config (the held-out accuracy and the reward statistics
    are measured on the gathered model after training)."""
    one, two = recipe.parent / "rm1" / "rm", tmp_path / "rm2" / "rm"
    if not one.exists():
        ran("rm", "--recipe", str(recipe), *RM, "--set", "rm.batch_size=8", "--out", str(one))  # in this process
    fsdp = ("--accelerate-config", str(_fsdp_config(tmp_path))) if layout == "fsdp2" else ()
    run_cli("rm", "--recipe", str(recipe), *RM, "--set", "rm.batch_size=4", "--num-processes", "2", *fsdp,
            "--out", str(two))
    assert _manifest(two)["world_size"] == 2
    if fsdp:
        _halves(two, trained_only=True)
    _only_run(two.parent, "rm")
    assert _max_diff(two / "adapter_model.safetensors", one / "adapter_model.safetensors") < ATOL
    a, b = _manifest(one), _manifest(two)
    assert b["metrics"]["eval_accuracy"] == a["metrics"]["eval_accuracy"]
    assert b["reward_stats"]["mean"] == pytest.approx(a["reward_stats"]["mean"], abs=1e-4)


@pytest.mark.slow  # DPO goes through the trainer and the save of SFT's sharded test: run with pytest -m slow
def test_dpo_sharded_over_two_processes_matches_one(parents, tmp_path):
    """DPO with the shipped FSDP config: the policy and the frozen reference adapters on the sharded base, each
    process half of every weight; the trained policy equals one process's."""
    recipe, _ = parents
    sets = ("--set", "dpo.max_steps=3", "--set", "dpo.eval_fraction=0", "--set", "data.eval_preference=null")
    one, two = tmp_path / "one" / "dpo", tmp_path / "two" / "dpo"
    ran("dpo", "--recipe", str(recipe), *sets, "--set", "dpo.batch_size=8", "--out", str(one))
    run_cli("dpo", "--recipe", str(recipe), *sets, "--set", "dpo.batch_size=4", "--num-processes", "2",
            "--accelerate-config", str(_fsdp_config(tmp_path)), "--out", str(two))
    assert _manifest(two)["distributed"] == "FSDP"
    _halves(two, trained_only=True)
    assert _max_diff(two / "adapter_model.safetensors", one / "adapter_model.safetensors") < ATOL


PPO = ("--set", "ppo.max_steps=3", "--set", "ppo.max_new_tokens=16", "--set", "ppo.eval_every=0",
       "--set", "ppo.ppo_epochs=2", "--set", "ppo.save_every=2",
       "--set", "ppo.mixed_precision=no")  # fp32: bf16 rounding depends on the batch shapes


@pytest.mark.parametrize("estimator", ["gae", "gae-shared", "reinforce_pp", "gae-agent"])
def test_ppo_on_two_processes_matches_one(request, tmp_path, estimator):
    """Each process samples its half of the same global batch (per-episode sampling keys), whitens advantages
    with statistics of both halves, normalises losses by the tokens of both, and sums gradients: the result is
    the single-process run's, to rounding. reinforce_pp (critic-free) with 2 responses per prompt: each process
    holds whole groups (the group-mean baseline is local) and normalises returns over both halves; its losses
    are aggregated per response (seq_mean_token_sum), each micro-batch weighed by its share of the responses, and
    its flat groups are refilled (DAPO's dynamic sampling) slot by slot, as one process refills them. gae-agent:
    multi-turn episodes with the calculator (the tool_policy fixture), each played from its own key wherever it
    runs, the environment's tokens masked out on both processes."""
    agent = estimator == "gae-agent"
    recipe, policy = request.getfixturevalue("tool_policy") if agent else (request.getfixturevalue("parents")[0],
                                                                            None)
    one, two = tmp_path / "one" / "ppo", tmp_path / "two" / "ppo"
    (tmp_path / "flat.py").write_text(FLAT_WHEN_EVEN)
    gae = estimator.startswith("gae")
    extra = ("--set", f"ppo.advantage={estimator.split('-')[0]}", "--set", f"ppo.samples_per_prompt={1 + (not gae)}",
             "--set", f"ppo.critic={'shared' if estimator == 'gae-shared' else 'adapter'}")
    if agent:
        extra += ("--policy", str(policy), "--set", "ppo.max_new_tokens=80")
    if not gae:
        extra += tuple(x for kv in ("ppo.loss_aggregation=seq_mean_token_sum", "ppo.drop_flat_groups=true",
                                    f"ppo.reward={{{tmp_path / 'flat.py'}:flat_when_even: 1.0}}",
                                    "ppo.missing_eos_penalty=null") for x in ("--set", kv))
    ran("ppo", "--recipe", str(recipe), *PPO, *extra, "--set", "ppo.batch_size=8",  # in this process
        "--set", "ppo.mini_batch_size=8", "--set", "ppo.micro_batch_size=4", "--out", str(one))
    proc = run_cli("ppo", "--recipe", str(recipe), *PPO, *extra, "--set", "ppo.batch_size=4",
                   "--set", "ppo.mini_batch_size=4", "--set", "ppo.micro_batch_size=2", "--num-processes", "2",
                   "--out", str(two))
    assert "3 steps of 8 episodes" in proc.stderr and "(2 processes x 4)" in proc.stderr
    a, b = _manifest(one), _manifest(two)
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert b["metrics"]["episodes"] == a["metrics"]["episodes"] == 24
    _only_run(two.parent, "ppo")
    critic = {"gae": ("value/adapter_model.safetensors", "value/value_head.safetensors"),
              "gae-shared": ("value/value_head.safetensors",),
              "gae-agent": ("value/model.safetensors",)}.get(estimator, ())  # agent: the fully tuned parent's copies
    weights = "model.safetensors" if agent else "adapter_model.safetensors"
    assert (two / "value").exists() == (one / "value").exists() == bool(critic)
    for name in (weights, *critic, f"checkpoints/step_000002/{weights}"):
        assert _max_diff(two / name, one / name) < ATOL, name
    rows = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (one, two)]
    assert len(rows[0]) == len(rows[1]) == 3
    for x, y in zip(*rows):  # the same episodes, so the same statistics of the whole batch
        for key in ("objective/score_total", "objective/kl", "response/length", "ppo/kl_coef", "policy/loss",
                    *(("objective/resampled", "objective/flat_groups") if not gae else ()),
                    *(("agent/turns", "agent/calls", "agent/ended_answered") if agent else ())):
            assert y[key] == pytest.approx(x[key], rel=1e-3, abs=1e-5), key
    if not gae:
        assert sum(r["objective/resampled"] for r in rows[0]) > 0, "no group was refilled: nothing compared"
    if agent:
        assert max(r["agent/turns"] for r in rows[0]) > 1, "no episode called a tool: nothing multi-turn compared"


def _two_nodes(tmp_path: Path, cli_args: list[str]) -> list[str]:
    """Run ``rlhf CLI_ARGS`` as two machines would (the shipped ``two_nodes.yaml``, copied once per machine with its
    own ``machine_rank``, the first machine at 127.0.0.1, one process each), both launchers at once on this host;
    returns their stderr. One thread a process, as ``--num-processes 2`` gives each on this 2-core machine."""
    import socket
    import subprocess
    import sys

    import yaml

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    template = yaml.safe_load((ROOT / "recipes" / "accelerate" / "two_nodes.yaml").read_text())
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in (0, 1):
        config = tmp_path / f"node{rank}.yaml"
        config.write_text(yaml.safe_dump({**template, "num_processes": 2, "machine_rank": rank,
                                          "main_process_ip": "127.0.0.1", "main_process_port": port}))
        procs.append(subprocess.Popen([sys.executable, "-m", "rlhf.cli", *cli_args, "--accelerate-config",
                                       str(config)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"{p.args}\n{out}\n{err}"
    return [err for _, err in outs]


@pytest.mark.slow  # a minute: run with pytest -m slow
def test_sft_and_ppo_on_two_machines_match_two_processes_on_one(parents, recipe, tmp_path):
    """``two_nodes.yaml`` as a user fills it in, one launcher per "machine" (``machine_rank`` 0 and 1, rendezvous
    at the first): SFT and PPO give the weights of the same two processes on one machine, and only machine 0's
    process writes the run directory."""
    sft = tmp_path / "sft-nodes" / "sft"
    _two_nodes(tmp_path, ["sft", "--recipe", str(recipe), *SFT, "--set", "sft.batch_size=4", "--out", str(sft)])
    assert _manifest(sft)["world_size"] == 2 and _manifest(sft)["distributed"] == "MULTI_CPU"
    _only_run(sft.parent, "sft")
    one_node = recipe.parent / "sft2" / "sft"  # test_sft_on_two_processes_matches_one's run
    if not one_node.exists():
        run_cli("sft", "--recipe", str(recipe), *SFT, "--set", "sft.batch_size=4", "--num-processes", "2",
                "--out", str(one_node))
    assert _max_diff(sft / "adapter_model.safetensors", one_node / "adapter_model.safetensors") < ATOL

    prompt_recipe, _ = parents
    ppo, one = tmp_path / "ppo-nodes" / "ppo", tmp_path / "ppo-one" / "ppo"
    sets = [*PPO, "--set", "ppo.batch_size=4", "--set", "ppo.mini_batch_size=4", "--set", "ppo.micro_batch_size=2"]
    errs = _two_nodes(tmp_path, ["ppo", "--recipe", str(prompt_recipe), *sets, "--out", str(ppo)])
    assert "(2 processes x 4)" in errs[0] and "(2 processes x 4)" not in errs[1]  # machine 0 speaks for the run
    run_cli("ppo", "--recipe", str(prompt_recipe), *sets, "--num-processes", "2", "--out", str(one))
    assert _manifest(ppo)["world_size"] == 2
    _only_run(ppo.parent, "ppo")
    for name in ("adapter_model.safetensors", "value/adapter_model.safetensors", "value/value_head.safetensors"):
        assert _max_diff(ppo / name, one / name) < ATOL, name


@pytest.fixture(scope="module")
def full_parents(tmp_path_factory):
    """Full fine-tuned SFT and RM runs (every weight trained: PPO then holds four whole copies)."""
    d = tmp_path_factory.mktemp("full")
    recipe = write_recipe(d / "full.yaml", run_dir=str(d / "runs"), adapter={"method": "full"})
    ran("sft", "--recipe", str(recipe), "--set", "sft.max_steps=2", "--set", "sft.lr=1e-4", "--set",
        "sft.eval_fraction=0")
    ran("rm", "--recipe", str(recipe), "--set", "rm.max_steps=2", "--set", "rm.lr=1e-4", "--set", "rm.stats_samples=32",
        "--set", "rm.eval_fraction=0", "--set", "data.eval_preference=null")
    return recipe


FULL_PPO = (*PPO, "--set", "ppo.lr=1e-5", "--set", "ppo.save_every=1")
HALF = ("--set", "ppo.batch_size=4", "--set", "ppo.mini_batch_size=4", "--set", "ppo.micro_batch_size=2")
FULL_FILES = ("model.safetensors", "value/model.safetensors", "checkpoints/step_000002/model.safetensors")


def _process_tree(pid: int) -> list[int]:
    """``pid`` and every process it started, and they started (torchrun's workers have process groups of their
    own)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, parent pid, ...
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return [pid] + [x for child in children for x in _process_tree(child)]


def _rank_of(pid: int) -> str | None:
    """The RANK a launched process runs as (from its environment), or None."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((x[5:].decode() for x in env if x.startswith(b"RANK=")), None)


def test_full_ppo_sharded_over_two_processes_matches_one_and_resumes(full_parents, tmp_path):
    """Full fine-tuning PPO under the shipped FSDP config: the four copies (policy and value trained, reference and
    reward frozen) are FSDP2 shards over two gloo processes, each holding half of every weight, of the gradients
    and of the Adam state; the rollout gathers the policy once; the weights equal one process's. Killed with
    SIGKILL (one of its processes) after a checkpoint and resumed, still sharded, it ends with the uninterrupted
    sharded run's weights bit for bit. Stopped with SIGTERM first, it says in one line how to continue, launch
    options included; with a process killed, which one died and how to continue."""
    import shlex
    import signal
    import subprocess
    import sys
    import time

    recipe = full_parents
    one, two, resumed = (tmp_path / name / "ppo" for name in ("one", "two", "resumed"))
    ran("ppo", "--recipe", str(recipe), *FULL_PPO, "--set", "ppo.batch_size=8", "--set", "ppo.mini_batch_size=8",
        "--set", "ppo.micro_batch_size=4", "--out", str(one))
    sharded = ("--num-processes", "2", "--accelerate-config", str(_fsdp_config(tmp_path)))
    proc = run_cli("ppo", "--recipe", str(recipe), *FULL_PPO, *HALF, *sharded, "--out", str(two))
    assert "(2 processes x 4, FSDP2 shards)" in proc.stderr
    assert _manifest(two)["distributed"] == "FSDP" and _manifest(two)["world_size"] == 2
    _halves(two, trained_only=True)
    _only_run(two.parent, "ppo")
    for name in FULL_FILES:
        assert _max_diff(two / name, one / name) < ATOL, name

    # SIGTERM to the launching command once a step is logged: every process finishes the step and the main one
    # writes a resume checkpoint; one line says how to continue, with the launch options
    argv = [sys.executable, "-m", "rlhf.cli", "ppo", "--recipe", str(recipe), *FULL_PPO, *HALF, *sharded,
            "--out", str(resumed)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    stopped = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = resumed.parent / ".ppo.partial" / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and stopped.poll() is None and not (metrics.is_file() and metrics.read_text()):
        time.sleep(0.05)
    stopped.send_signal(signal.SIGTERM)
    err = stopped.communicate(timeout=300)[1]
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert stopped.returncode == 143 and "Traceback" not in err and len(errors) == 1, err
    assert errors[0].endswith(f"continue with `rlhf {shlex.join(argv[3:])} --resume`"), errors  # launch options too
    assert err.count("SIGTERM: finishing this step") == 1

    # resumed, then SIGKILL to one of the two processes (as the out-of-memory killer does) after a newer
    # checkpoint: the other stops with it, and the launch ends in one line saying which process died, by what, and
    # how to continue from the checkpoint it kept (it was the launcher's traceback, and nothing on resuming)
    work = resumed.parent / ".ppo.work"
    seen = sorted(work.glob("step_*"))
    killed = subprocess.Popen([*argv, "--resume"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    while time.time() < deadline and killed.poll() is None and sorted(work.glob("step_*")) == seen:
        time.sleep(0.05)
    victim = [pid for pid in _process_tree(killed.pid) if _rank_of(pid) == "1"]
    for pid in victim:
        os.kill(pid, signal.SIGKILL)
    err = killed.communicate(timeout=300)[1]
    if killed.returncode != 0:  # else the run ended before the kill: nothing to check
        errors = [x for x in err.splitlines() if x.startswith("error: ")]
        assert victim and killed.returncode == 137 and "Traceback" not in err and len(errors) == 1, err
        assert errors[0].startswith("error: ppo: process 1 of the run was killed by SIGKILL") and errors[0].endswith(
            f"its newest resume checkpoint is kept: continue with `rlhf {shlex.join(argv[3:])} --resume`"), errors
        assert sorted(work.glob("step_*")) != seen  # the checkpoint it had is kept
        run_cli("ppo", *argv[4:], "--resume")
    assert _manifest(resumed)["resumed"] is True
    for name in FULL_FILES:
        a, b = load_file(two / name), load_file(resumed / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_sharded_ppo_reads_the_weights_on_the_main_process_alone(tmp_path):
    """Full-fine-tuning PPO sharded over two processes: the main process loads each copy and scatters the shards,
    the other builds its copies on the meta device and never holds one whole (it loaded every copy whole, as the
    main one does, and sharded it after). On a random Llama of 19.5M parameters (78 MB a copy in fp32; policy and
    reference, GRPO from the base against gold) the second process's peak memory after loading is below the
    main one's by about those two copies less their shards (measured: 451 against 564 MB; before, 527 and 527);
    the weights themselves equal one process's (test_full_ppo_sharded_...)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sharded_memory", ROOT / "tests" / "bench" / "sharded_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.build_base(tmp_path / "base", 512, 6)
    recipe = write_recipe(tmp_path / "r.yaml", run_dir=str(tmp_path / "runs"), model={"base": str(tmp_path / "base")},
                          adapter={"method": "full"})
    sets = ["ppo.reward={gold: 1.0}", "ppo.advantage=grpo", "ppo.samples_per_prompt=2", "ppo.batch_size=2",
            "ppo.mini_batch_size=2", "ppo.micro_batch_size=2", "ppo.max_new_tokens=8", "ppo.max_steps=1",
            "ppo.eval_every=0", "ppo.mixed_precision=no"]
    run_cli("ppo", "--recipe", str(recipe), "--policy", "base", "--out", str(tmp_path / "ppo"), "--num-processes",
            "2", "--accelerate-config", str(_fsdp_config(tmp_path)), *[x for kv in sets for x in ("--set", kv)])
    main, other = _manifest(tmp_path / "ppo")["shards"]["loaded_peak_rss_mb"]
    assert other < main - 50, (main, other)


def test_ppo_refuses_configs_it_cannot_shard_with(parents, tmp_path, monkeypatch):
    """LoRA PPO runs data-parallel (PPO shards full fine-tuning only); DeepSpeed is for the trainer stages. A
    recipe asking for full fine-tuning from LoRA parents is told which parent fixed the method."""
    recipe, runs = parents
    config = ROOT / "recipes" / "accelerate" / "fsdp.yaml"
    proc = run_cli("ppo", "--recipe", str(recipe), "--out", str(tmp_path / "ppo"), "--accelerate-config",
                   str(config), "--num-processes", "2", "--set", "adapter.method=full", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert [x for x in proc.stderr.splitlines() if "error" in x] == [
        f"error: ppo: the accelerate config {config} asks for fsdp sharding, but PPO with lora (the method of "
        f"{runs / 'rm'}, which PPO continues) runs data-parallel: a whole base on every process, only the adapters' "
        "gradients summed (recipes/accelerate/multi_gpu.yaml, or --num-processes N); PPO shards full fine-tuning"]
    from click.testing import CliRunner

    from rlhf.cli import cli

    # in one process, the recipe's method that PPO does not use is named (then a length error stops it early)
    result = CliRunner().invoke(cli, ["ppo", "--recipe", str(recipe), "--out", str(tmp_path / "ppo"), "--set",
                                      "adapter.method=full", "--set", "ppo.max_prompt_length=100000"])
    assert result.exit_code == 2 and f"ppo: adapter.method full in {recipe}" in result.stderr and \
        f"is not used: PPO continues with lora, the method {runs / 'rm'} trained with" in result.stderr, result.stderr
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch sets for a DeepSpeed config
    proc = run_cli("ppo", "--recipe", str(recipe), "--out", str(tmp_path / "ppo"), check=False)
    assert proc.returncode == 2 and "asks for deepspeed" in proc.stderr
    assert not (tmp_path / "ppo").exists()
