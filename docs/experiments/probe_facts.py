"""Probe: how fast does a tiny llama learn the ID math facts from text alone? Accuracy against tokens.

usage: probe_facts.py HIDDEN LAYERS VOCAB LR FORMAT STEPS [BATCH]
FORMAT: qa ("Question: ...\nAnswer: ..." as CPT reads it), eq (bare "a op b = c"), plain (prompt, then solution).
Trains on ID training problems (batch x 128-token windows), evaluates greedy answers on 300 held-out ID prompts
six times; no lmlab pipeline, so it measures the data and the model alone (docs/experiments/quickstart.md).
"""
import sys, time, random, re, torch
sys.path.insert(0, "/work/main")
from transformers import LlamaConfig, LlamaForCausalLM
from lmlab.data.general import general_documents
from lmlab.data.tokenizer import train_tokenizer, load_tokenizer, save_tokenizer
from lmlab.data.mathgen import math_problems, as_text
h, L, V, lr, fmt = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
steps = int(sys.argv[6]); B, T = (int(sys.argv[7]) if len(sys.argv) > 7 else 32), 128
torch.manual_seed(0); torch.set_num_threads(2)
import os
grouped = os.environ.get("DIGITS") == "grouped"  # numbers as BPE merges (trained on math too), not one per digit
tokdir = f"/tmp/probe/tok{V}{'g' if grouped else ''}"
if not os.path.exists(tokdir + "/tokenizer.json"):
    texts = [t for _, t in general_documents()]
    if grouped:
        import lmlab.data.tokenizer as tk
        from tokenizers import pre_tokenizers
        texts += [as_text(p) for p in math_problems("id", 20000, seed=5)]
        original = pre_tokenizers.Digits
        pre_tokenizers.Digits = lambda individual_digits: original(individual_digits=False)
    tok = train_tokenizer(iter(texts), vocab_size=V, min_frequency=2, max_bytes=6_000_000)
    save_tokenizer(tok, tokdir)
tok = load_tokenizer(tokdir)
train = math_problems("id", 60000, seed=0)
def text(p):
    if fmt == "qa": return as_text(p)
    if fmt == "eq": return p.solution.split(". ")[0]
    return f"{p.prompt}\n{p.solution}"
ids = []
for p in train:
    ids += tok(text(p) + tok.eos_token, add_special_tokens=False)["input_ids"]
print(f"{len(ids):,} tokens for {len(train)} problems ({len(ids)/len(train):.1f}/problem)", flush=True)
data = torch.tensor(ids)
ev = math_problems("id", 300, seed=1234, part="eval")
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=h, intermediate_size=3 * h, num_hidden_layers=L,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
m = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 50) * max(0.05, 1 - s / steps))
def evaluate():
    m.eval(); tok.padding_side = "left"; correct = 0
    prompts = [("Question: " + p.prompt + "\nAnswer:") if fmt == "qa" else (p.solution.split(" = ")[0] + " =") if fmt == "eq" else (p.prompt + "\n") for p in ev]
    with torch.no_grad():
        for i in range(0, len(ev), 100):
            b = tok(prompts[i:i+100], return_tensors="pt", padding=True, add_special_tokens=False)
            out = m.generate(**b, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            for p, o in zip(ev[i:i+100], tok.batch_decode(out[:, b["input_ids"].shape[1]:], skip_special_tokens=True)):
                mm = re.search(r"The answer is (-?\d+)", o) if fmt != "eq" else re.match(r" (-?\d+)", o)
                correct += bool(mm and int(mm.group(1)) == p.answer)
    m.train(); return correct / len(ev)
t0 = time.time(); pos = 0
for s in range(steps):
    starts = torch.randint(0, len(data) - T - 1, (B,))
    x = torch.stack([data[i:i + T] for i in starts])
    loss = m(input_ids=x, labels=x).loss; loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); sched.step(); opt.zero_grad()
    if (s + 1) % (steps // 6) == 0:
        el = time.time() - t0
        print(f"step {s+1} tokens {(s+1)*B*T:,} loss {loss.item():.3f} acc {evaluate():.3f} time {el:.0f}s", flush=True)
