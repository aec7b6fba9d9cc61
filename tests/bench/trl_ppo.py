"""TRL 0.28's PPOTrainer on the same models, prompts and sizes as our PPO stage (the benchmark's reference side).

Runs in its own environment (trl==0.28.0, transformers<5; see bench.py). Prints one JSON line: the wall time of
each PPO update (rollout + scoring + the PPO epochs), taken from the trainer's step callback.

    python trl_ppo.py --policy MERGED_SFT --reward MERGED_RM --prompts ids.json --batch 8 --steps 4 \
        --response-length 24 --epochs 4 --lr 2e-4 --kl-coef 0.02 --r 16 --alpha 32
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", required=True, help="a plain Hugging Face causal LM directory (the SFT policy)")
    ap.add_argument("--reward", required=True, help="a plain sequence-classification directory (the reward model)")
    ap.add_argument("--prompts", required=True, help="JSON list of prompt token-id lists")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--response-length", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--kl-coef", type=float, default=0.02)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bf16", action="store_true", help="mixed precision bf16 (the Trainer's autocast)")
    args = ap.parse_args()

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    # transformers 4.57 cannot read a tokenizer saved by transformers 5: rebuild it from tokenizer.json
    special = json.load(open(os.path.join(args.policy, "tokenizer_config.json")))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.policy, "tokenizer.json"),
                                        pad_token=special.get("pad_token") or special.get("eos_token"),
                                        eos_token=special.get("eos_token"), bos_token=special.get("bos_token"))
    prompts = json.load(open(args.prompts))[:args.batch * args.steps]
    dataset = Dataset.from_dict({"input_ids": prompts})

    policy = AutoModelForCausalLM.from_pretrained(args.policy)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1)
    for m in (policy, value, reward):
        m.config.pad_token_id = tokenizer.pad_token_id

    config = PPOConfig(
        output_dir=args.out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        num_mini_batches=1, num_ppo_epochs=args.epochs, local_rollout_forward_batch_size=args.batch,
        total_episodes=args.batch * args.steps, response_length=args.response_length, stop_token=None,
        temperature=1.0, learning_rate=args.lr, kl_coef=args.kl_coef, num_sample_generations=0,
        use_cpu=not torch.cuda.is_available(), bf16=args.bf16, report_to="none", save_strategy="no",
        logging_steps=10_000, seed=42, dataloader_num_workers=0)

    times: list[float] = []

    class Clock(TrainerCallback):
        last = None

        def on_train_begin(self, *a, **k):
            self.last = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            times.append(now - self.last)
            self.last = now

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
                         value_model=value, train_dataset=dataset, eval_dataset=dataset, callbacks=[Clock()],
                         peft_config=LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0,
                                                target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    print(json.dumps({"step_seconds": times}))


if __name__ == "__main__":
    main()
