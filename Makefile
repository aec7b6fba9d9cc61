# The two commands a fresh clone needs:  make sft rm ppo   and   make test
# Every target installs into .venv first (fast when already installed).

PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch is installed first so that no multi-GB CUDA build is pulled in; on a GPU machine use
# e.g. `make install TORCH=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
RECIPE ?= recipes/tiny.yaml
ARGS   ?=
PYTEST_ARGS ?=

BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install sft sample label rm round round-check ppo ppo-gold objectives critics dpo eval browser test test-fast bench gpu-check methods-report sharded-memory clean-runs

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# Stage targets re-run their stage and replace its previous output (the rlhf command itself refuses without
# --overwrite). Run one stage against another recipe with RECIPE=..., pass more options with ARGS="...".
sft: install
	$(BIN)/rlhf sft --recipe $(RECIPE) --overwrite $(ARGS)

# The InstructGPT loop (RECIPE=recipes/tiny-ranked.yaml): the SFT run samples K candidates per prompt for the
# training and the held-out prompts; LABELLER ranks them into the files the recipe's data.preference and
# data.eval_preference name. LABELLER: a scorer (gold: a simulated annotator) or a reward-model run directory.
RANKED  ?= runs/tiny-ranked
K       ?= 4
LABELLER ?= gold

sample: install
	$(BIN)/rlhf sample $(RANKED)/sft --prompts data/tiny/prompts.jsonl -k $(K) --out $(RANKED)/candidates.jsonl \
		--overwrite $(ARGS)
	$(BIN)/rlhf sample $(RANKED)/sft --prompts data/tiny/heldout_prompts.jsonl -k $(K) --seed 1 \
		--out $(RANKED)/heldout_candidates.jsonl --overwrite $(ARGS)

label: install
	$(BIN)/rlhf label $(RANKED)/candidates.jsonl --by $(LABELLER) --out $(RANKED)/rankings.jsonl --overwrite $(ARGS)
	$(BIN)/rlhf label $(RANKED)/heldout_candidates.jsonl --by $(LABELLER) --out $(RANKED)/heldout_rankings.jsonl \
		--overwrite $(ARGS)

rm: install
	$(BIN)/rlhf rm --recipe $(RECIPE) --overwrite $(ARGS)

# Iterated rounds (InstructGPT, Llama 2: collect new comparisons from the latest policies and train again). Round N
# (2, 3, ...) of the loop above, in $(RANKED)/roundN: the base (after 3 demonstrations, as eval's in-context row),
# the SFT policy and the previous round's PPO policy each sample ROUND_K candidates per prompt (tagged with their
# policy), LABELLER ranks them, the reward model trains afresh on
# every round's rankings so far (held out: this round's held-out rankings), PPO runs from the SFT policy against
# it, and one eval puts every round's PPO policy side by side, scored by this round's reward model.
#   make sft sample label rm ppo eval RECIPE=recipes/tiny-ranked.yaml     (round 1)
#   make round ROUND=2 RECIPE=recipes/tiny-ranked.yaml
# Interrupted, `make round` again continues: finished steps are kept, an interrupted sample, RM or PPO run resumes.
ROUND   ?= 2
ROUND_K ?= 2
ROUND_DIR = $(RANKED)/round$(ROUND)
ROUND_PREVIOUS = $(if $(filter 2,$(ROUND)),$(RANKED),$(RANKED)/round$(shell expr $(ROUND) - 1 2>/dev/null))
ROUND_POLICIES = base:data/tiny-base $(RANKED)/sft $(ROUND_PREVIOUS)/ppo --icl-shots 3 --demos data/tiny/sft.jsonl
ROUND_RANKINGS = $(RANKED)/rankings.jsonl $(foreach n,$(shell seq 2 $(ROUND) 2>/dev/null),$(RANKED)/round$(n)/rankings.jsonl)
ROUND_ONE = make sft sample label rm ppo eval RECIPE=$(RECIPE)
# $(call once,OUT,COMMAND): nothing when OUT finished, --resume when it was interrupted, else a new run
once = if [ -f $(1)/manifest.json ]; then echo "round $(ROUND): $(1) is done"; \
	elif [ -d $(dir $(1)).$(notdir $(1)).partial ]; then $(2) --out $(1) --resume; else $(2) --out $(1); fi

# what a round needs before anything runs: a round number (2, 3, ...) and the previous round's PPO run
ROUND_NUMBER = make round: ROUND is the number of the round to run, 2 or more (round 1 is $(ROUND_ONE)); got '$(ROUND)'
ROUND_MISSING = make round: round $(ROUND) needs the PPO run of the round before it at $(ROUND_PREVIOUS)/ppo \
	($(if $(filter 2,$(ROUND)),$(ROUND_ONE),make round ROUND=$(shell expr $(ROUND) - 1 2>/dev/null) RECIPE=$(RECIPE)) makes it)
round-check:
	@case "$(ROUND)" in ''|*[!0-9]*|0*|1) echo "$(ROUND_NUMBER)" >&2; exit 2;; esac
	@test -f $(ROUND_PREVIOUS)/ppo/manifest.json || { echo "$(ROUND_MISSING)" >&2; exit 2; }

round: round-check install
	mkdir -p $(ROUND_DIR)/rm_data
	test -f $(ROUND_DIR)/candidates.jsonl || $(BIN)/rlhf sample $(ROUND_POLICIES) \
		--prompts data/tiny/prompts.jsonl -k $(ROUND_K) --seed $(ROUND)0 --out $(ROUND_DIR)/candidates.jsonl --resume
	test -f $(ROUND_DIR)/heldout_candidates.jsonl || $(BIN)/rlhf sample $(ROUND_POLICIES) \
		--prompts data/tiny/heldout_prompts.jsonl -k $(ROUND_K) --seed $(ROUND)1 \
		--out $(ROUND_DIR)/heldout_candidates.jsonl --resume
	test -f $(ROUND_DIR)/rankings.jsonl || $(BIN)/rlhf label $(ROUND_DIR)/candidates.jsonl --by $(LABELLER) \
		--out $(ROUND_DIR)/rankings.jsonl
	test -f $(ROUND_DIR)/heldout_rankings.jsonl || $(BIN)/rlhf label $(ROUND_DIR)/heldout_candidates.jsonl \
		--by $(LABELLER) --out $(ROUND_DIR)/heldout_rankings.jsonl
	n=1; for f in $(ROUND_RANKINGS); do cp $$f $(ROUND_DIR)/rm_data/round$$n.jsonl; n=$$((n + 1)); done
	$(call once,$(ROUND_DIR)/rm,$(BIN)/rlhf rm --recipe $(RECIPE) --set data.preference=$(ROUND_DIR)/rm_data \
		--set data.eval_preference=$(ROUND_DIR)/heldout_rankings.jsonl $(ARGS))
	$(call once,$(ROUND_DIR)/ppo,$(BIN)/rlhf ppo --recipe $(RECIPE) --reward $(ROUND_DIR)/rm $(ARGS))
	$(BIN)/rlhf eval --recipe $(RECIPE) --reward $(ROUND_DIR)/rm --policy sft --policy ppo \
		$(foreach n,$(shell seq 2 $(ROUND)),--policy $(RANKED)/round$(n)/ppo) --out $(ROUND_DIR)/eval --overwrite


ppo: install
	$(BIN)/rlhf ppo --recipe $(RECIPE) --overwrite $(ARGS)

# DPO of the SFT policy on the recipe's preference data (dpo.loss: sigmoid, ipo, hinge, robust or simpo), the SFT
# policy as its reference; into runs/<name>/dpo. `make eval ARGS="--policy sft --policy ppo --policy dpo"` compares.
dpo: install
	$(BIN)/rlhf dpo --recipe $(RECIPE) --overwrite $(ARGS)

eval: install
	$(BIN)/rlhf eval --recipe $(RECIPE) --overwrite $(ARGS)

# PPO against the tiny world's gold scorer instead of the reward model (ppo.reward={gold: 4.0}: no reward model
# is loaded), from the same SFT policy; then an eval that puts it beside PPO against the reward model
# (runs/tiny/eval-gold). Needs `make sft ppo` first.
ppo-gold: install
	$(BIN)/rlhf ppo --recipe $(RECIPE) --overwrite --set 'ppo.reward={gold: 4.0}' --out runs/tiny/ppo-gold $(ARGS)
	$(BIN)/rlhf eval --recipe $(RECIPE) --overwrite --policy sft --policy ppo --policy runs/tiny/ppo-gold \
		--out runs/tiny/eval-gold

# The policy objectives side by side (docs/results.md): from the recipe's SFT and RM runs, K = 4 responses per
# prompt, the recipe's steps, each against the reward model and against the gold scorer; then one eval of them
# all (runs/tiny/objectives/eval). Needs `make sft rm` first; ~1 h on 2 CPU cores.
OBJECTIVES := runs/tiny/objectives
OBJECTIVE_RUNS := grpo dr_grpo dapo gspo cispo
objective_sets.grpo    := --set ppo.advantage=grpo
objective_sets.dr_grpo := --set ppo.advantage=dr_grpo
objective_sets.dapo    := --set ppo.advantage=grpo --set ppo.clip_low=0.2 --set ppo.clip_high=0.28 \
                          --set ppo.loss_aggregation=token_mean --set ppo.overlong_buffer=16 \
                          --set ppo.drop_flat_groups=true
objective_sets.gspo    := --set ppo.advantage=grpo --set ppo.policy_loss=gspo
objective_sets.cispo   := --set ppo.advantage=grpo --set ppo.policy_loss=cispo

objectives: install
	for name in $(OBJECTIVE_RUNS); do \
		$(MAKE) --no-print-directory objective-$$name || exit 1; done
	$(BIN)/rlhf eval --recipe $(RECIPE) --overwrite --policy sft \
		$(foreach n,$(OBJECTIVE_RUNS),--policy $(OBJECTIVES)/$(n) --policy $(OBJECTIVES)/$(n)-gold) \
		--out $(OBJECTIVES)/eval

objective-%: install
	$(BIN)/rlhf ppo --recipe $(RECIPE) --overwrite --out $(OBJECTIVES)/$* --set ppo.samples_per_prompt=4 \
		$(objective_sets.$*) $(ARGS)
	$(BIN)/rlhf ppo --recipe $(RECIPE) --overwrite --out $(OBJECTIVES)/$*-gold --set ppo.samples_per_prompt=4 \
		--set 'ppo.reward={gold: 4.0}' $(objective_sets.$*) $(ARGS)

# The two critics side by side (docs/ppo.md, "The shared critic"): GAE with the value adapter and with the shared
# critic (a head on the policy), each against the reward model and against the gold scorer, from the recipe's SFT
# and RM runs; then one eval of them all (runs/tiny/critics/eval). Needs `make sft rm` first; ~12 min on 2 cores.
CRITICS := runs/tiny/critics
critics: install
	for critic in adapter shared; do \
		$(BIN)/rlhf ppo --recipe $(RECIPE) --overwrite --out $(CRITICS)/$$critic --set ppo.critic=$$critic \
			$(ARGS) || exit 1; \
		$(BIN)/rlhf ppo --recipe $(RECIPE) --overwrite --out $(CRITICS)/$$critic-gold --set ppo.critic=$$critic \
			--set 'ppo.reward={gold: 4.0}' $(ARGS) || exit 1; done
	$(BIN)/rlhf eval --recipe $(RECIPE) --overwrite --policy sft \
		$(foreach c,adapter adapter-gold shared shared-gold,--policy $(CRITICS)/$(c)) --out $(CRITICS)/eval

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The labelling page's browser test drives Debian's chromium through chromedriver: installed here when missing
# (as root, or with sudo). .ci/run calls it before make test.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		$(SUDO) apt-get install -y -q chromium chromium-driver || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver; }

# The fast tier (~2 min here): PPO maths, data formats, recipe checks, bad input, the method table, every model
# family through every stage in-process. Run it after every change; `make test` (CI) before a commit lands.
test-fast: install
	$(BIN)/python -m pytest -m fast $(PYTEST_ARGS)

# The benchmark (not part of make test; ~15 min): PPO against TRL 0.28 (installed into its own .venv-trl),
# SFT against the matmul peak, the default pipeline per stage. Writes runs/bench/bench.md and bench.json.
TRL_VENV ?= .venv-trl

$(TRL_VENV)/.installed:
	@test -x $(TRL_VENV)/bin/python || $(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(TRL_VENV)/bin/python -m pip install -q "trl==0.28.0" "transformers<5" peft
	@touch $@

bench: install $(TRL_VENV)/.installed
	$(BIN)/python tests/bench/bench.py --trl-python $(TRL_VENV)/bin/python $(ARGS)

# On one GPU (install torch for it: see TORCH_INDEX above): a random-initialised model of Qwen2.5-0.5B's shape
# through SFT, RM, PPO and eval, then PPO at batch 64 with 128-token responses measured (tokens/s, phases, peak
# memory, step-1 KL and ratio). A few minutes; writes runs/gpu-check/gpu_check.md and .json. ARGS="--tiny" runs
# its code on the CPU.
gpu-check: install
	$(BIN)/python tests/bench/gpu_check.py $(ARGS)

# Every fine-tuning method through SFT on the tiny world: trainable parameters, memory, time, gold score
# (minutes per method; not part of make test). Writes runs/methods-report/report.md.
methods-report: install
	$(BIN)/python tests/bench/methods_report.py $(ARGS)

# Full-fine-tuning PPO's memory per process on a ~103M-parameter random Llama: one process, two data parallel,
# two FSDP2-sharded (a few minutes; not part of make test). Writes runs/sharded-memory/sharded_memory.md.
sharded-memory: install
	$(BIN)/python tests/bench/sharded_memory.py $(ARGS)

clean-runs:
	rm -rf runs
