"""``make gpu-check`` in its CPU mode: the check's whole code path (build, every stage, the PPO measurement)."""

from __future__ import annotations

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "bench"))


def test_gpu_check_runs_in_its_cpu_mode(tmp_path):
    import gpu_check

    result = gpu_check.main(["--tiny", "--out", str(tmp_path), "--steps", "2"])
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == json.loads(json.dumps(result))
    assert all(isinstance(result["pipelines"]["lora"][s], float) for s in ("sft", "rm", "ppo", "eval"))
    m = result["ppo"]
    assert m["batch"] == 8 and m["response_length"] == 16  # min_new_tokens: every response is full length
    assert m["generated_tokens_per_s"] > 0 and m["episodes_per_s"] > 0
    assert abs(m["step1_ratio_first"] - 1) < 1e-4 and abs(m["step1_kl"]) < 1e-3  # fp32 on a CPU: the passes agree
    assert m["generation_s"] + m["scoring_s"] + m["update_s"] <= m["step_s"]
    assert "generated tokens/s" in (tmp_path / "gpu_check.md").read_text()
    r = result["repeat"]  # the pipeline's PPO run twice: on this CPU, in fp32 weights, identical and said so
    assert r["identical"] and r["max_abs_diff"] == 0.0 and r["repeatable"] == [True, True], r
    assert "two identical PPO runs" in (tmp_path / "gpu_check.md").read_text()
