#!/usr/bin/env bash
# Offline demo: build a tiny Llama (random init) and fine-tune it on the support-ticket data shipped in
# examples/data, through the same command line a user runs on a real model. Prints the loss per epoch.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# Its files go to a temporary folder removed at the end; DEMO_DIR=folder keeps them there instead.
if [ -n "${DEMO_DIR:-}" ]; then
  work="$DEMO_DIR"
else
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
fi
python -m tuning.testing.tiny_model "$work/tiny-llama" >/dev/null

python -m tuning.sft_trainer \
  --model_name_or_path "$work/tiny-llama" \
  --training_data_path examples/data/support_tickets.jsonl \
  --data_formatter_template "### Input: {{input}} \n\n## Label: {{output}}" \
  --response_template "\n## Label:" \
  --output_dir "$work/out" --save_model_dir "$work/out/final" \
  --num_train_epochs 30 --per_device_train_batch_size 4 --gradient_accumulation_steps 2 \
  --learning_rate 5e-3 --warmup_ratio 0.1 --lr_scheduler_type cosine_with_min_lr \
  --lr_scheduler_kwargs '{"min_lr_rate": 0.1}' --save_total_limit 2

python - "$work/out" <<'PY'
import os
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from tuning.train import generate_answers, read_training_logs

out = sys.argv[1]
print("\nepoch  training loss")
for record in read_training_logs(out):
    print(f"{record['epoch']:5.0f}  {record['value']:.4f}")
model = AutoModelForCausalLM.from_pretrained(f"{out}/final")
tokenizer = AutoTokenizer.from_pretrained(f"{out}/final")
# the saved model's answers, by the code that writes eval_generations.jsonl (--eval_generations)
texts = ["@ShopCo my refund never came", "@NetFast thanks for the quick delivery"]
prompts = [tokenizer(f"### Input: {text} \n\n## Label:")["input_ids"] for text in texts]
answers = generate_answers(model, tokenizer, prompts, [tokenizer.eos_token_id], max_new_tokens=14)
for text, answer in zip(texts, answers):
    print(f"{text!r} -> {answer['generation'].strip()!r}")
kept = os.environ.get("DEMO_DIR")
print(f"\nmodel saved in {out}/final" if kept else "\n(temporary folder removed; DEMO_DIR=folder keeps the model)")
PY
