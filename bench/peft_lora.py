#!/usr/bin/env python3
"""Training throughput and memory of PyTorch + PEFT LoRA, for comparison with
`geek compress finetune` on the same model, adapter, rows and threads.

What it runs: the GGUF's weights dequantized to float32 by transformers (as geek's candle model
dequantizes them), a PEFT LoRA (r, alpha, all seven projections, on the top N layers when
--top-layers is given) and AdamW; the JSONL's examples tokenized by the GGUF's tokenizer and
packed greedily into rows of --seq-len tokens, the loss on completion tokens only; one optimizer
step per --accumulation rows of --batch. It prints one JSON line: tokens/s over the steps after
the first (warm-up) and the process's peak RSS.

Set up once (PyTorch is only needed for this comparison, never by geek):
    python3 -m venv /tmp/peft-bench && /tmp/peft-bench/bin/pip install torch transformers peft gguf
Then, for geek's matching run (one line each; run them one at a time on a quiet machine):
    /tmp/peft-bench/bin/python bench/peft_lora.py --gguf MODEL.gguf --data final.jsonl \
        --top-layers 4 --rank 16 --alpha 32 --seq-len 512 --accumulation 8 --steps 4 --threads 2
    geek compress finetune --model MODEL.gguf --data final.jsonl --top-layers 4 --rank 16 \
        --alpha 32 --seq-len 512 --accumulation 8 --steps 4 --threads 2 --out /tmp/ft
"""

import argparse
import json
import os
import resource
import time


def packed_rows(examples, tokenizer, seq_len):
    """Greedy packing as geek's `data::pack`: whole examples per row, the loss on completions."""
    rows, tokens, labels = [], [], []
    for ex in examples:
        p = tokenizer(ex["prompt"], add_special_tokens=True)["input_ids"]
        c = tokenizer(ex["completion"], add_special_tokens=False)["input_ids"]
        ids, lab = (p + c)[-seq_len:], ([-100] * len(p) + c)[-seq_len:]
        if len(tokens) + len(ids) > seq_len:
            rows.append((tokens, labels))
            tokens, labels = [], []
        tokens, labels = tokens + ids, labels + lab
    if tokens:
        rows.append((tokens, labels))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--top-layers", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--accumulation", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder, name = os.path.split(os.path.abspath(args.gguf))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    from gguf import GGUFReader

    if not any(t.name == "output.weight" for t in GGUFReader(args.gguf).tensors):
        # A tied output layer (SmolLM2): transformers leaves lm_head random when reading GGUF.
        model.lm_head.weight = model.model.embed_tokens.weight
    n_layer = model.config.num_hidden_layers
    layers = list(range(n_layer - args.top_layers, n_layer)) if args.top_layers else None
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        layers_to_transform=layers,
        bias="none",
    )
    model = get_peft_model(model, config)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    with open(args.data) as f:
        examples = [json.loads(line) for line in f if line.strip()]
    rows = packed_rows(examples, tokenizer, args.seq_len)
    per_step = args.batch * args.accumulation
    timed_tokens, timed_seconds, losses = 0, 0.0, []
    for step in range(args.steps):
        start = time.perf_counter()
        step_tokens = 0
        for micro in range(args.accumulation):
            picked = [rows[(step * per_step + micro * args.batch + i) % len(rows)] for i in range(args.batch)]
            width = max(len(t) for t, _ in picked)
            ids = torch.tensor([t + [0] * (width - len(t)) for t, _ in picked])
            lab = torch.tensor([l + [-100] * (width - len(l)) for _, l in picked])
            mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t, _ in picked])
            loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss / args.accumulation
            loss.backward()
            step_tokens += sum(len(t) for t, _ in picked)
            losses.append(loss.item() * args.accumulation)
        opt.step()
        opt.zero_grad()
        seconds = time.perf_counter() - start
        if step > 0:
            timed_tokens, timed_seconds = timed_tokens + step_tokens, timed_seconds + seconds
        print(f"step {step + 1}: {step_tokens / seconds:.1f} tokens/s", flush=True)
    print(json.dumps({
        "trainable": trainable,
        "rows": len(rows),
        "tokens_per_sec": timed_tokens / timed_seconds if timed_seconds else None,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "first_loss": losses[0],
        "torch": torch.__version__,
        "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
