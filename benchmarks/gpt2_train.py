"""A GPT-2-small-sized training step on CPU (124M parameters: 12 layers, d768, 12 heads, vocabulary 50257),
built with plain torch.nn on random tokens (no downloads). The program that benchmarks/html_gpt2.py audits."""

import argparse

import torch
from workloads import GPT, language_model_step

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--seq", type=int, default=128)
args = parser.parse_args()

torch.manual_seed(0)
model = GPT()
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
for _step in range(args.steps):
    language_model_step(model, optimizer, args.batch, args.seq)
