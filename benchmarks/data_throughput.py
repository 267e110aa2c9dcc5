"""Token-store preparation against a bare tokenise-and-concatenate pipeline, side by side in one run.

The corpus is real text: the Python sources of the installed packages, one jsonl
record per file, repeated to each size. The tokenizer is a byte-level BPE trained
by lmlab. The bare pipeline is what a person writes by hand (nanoGPT's
`prepare.py`): read lines, `json.loads`, the same fast tokenizer's
`encode_batch_fast`, EOS after each document, a uint16 array appended to a file;
with two processes it splits the file in two at a line boundary and each process
writes its half. lmlab is `prepare_store` (validation of every record, the
train/validation split by document hash, the content-addressed store) with
`num_proc` 1 and 2. Every measurement runs in a fresh process, which reports its
own peak RSS and its workers'. Both sides run with TOKENIZERS_PARALLELISM=false,
so one process is one core. Runs alternate A B, B A.

Also printed: bytes per token on disk, the time a second run of a pretraining
stage spends on data (preflight and rows from the existing store), and the
throughput of the streaming path (tokenising on the fly) against the store path.

    python benchmarks/data_throughput.py                 # 20 MB and 200 MB corpora
    python benchmarks/data_throughput.py --sizes-mb 20 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r'''
import json, os, resource, sys, time
mode, corpus, tok_dir, out, num_proc = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
began = time.perf_counter()
result = {}
if mode == "bare":
    import numpy as np
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    began = time.perf_counter()  # both sides are timed from a loaded tokenizer: preparation, not imports

    def run(path, start, end, target):
        tokens = 0
        with open(path, "rb") as fh, open(target, "wb") as dst:
            fh.seek(start)
            texts = []
            def flush():
                nonlocal tokens
                flat = []
                for enc in tok.encode_batch_fast(texts, add_special_tokens=False):
                    flat += enc.ids
                    flat.append(eos)
                np.asarray(flat, dtype=np.uint16).tofile(dst)
                tokens += len(flat)
            while fh.tell() < end:
                line = fh.readline()
                if not line:
                    break
                if line.strip():
                    texts.append(json.loads(line)["text"])
                if len(texts) == 512:
                    flush(); texts = []
            if texts:
                flush()
        return tokens

    size = os.path.getsize(corpus)
    if num_proc == 1:
        result["tokens"] = run(corpus, 0, size, out + ".bin")
    else:
        with open(corpus, "rb") as fh:
            fh.seek(size // 2); fh.readline(); middle = fh.tell()
        pid = os.fork()
        if pid == 0:
            run(corpus, middle, size, out + ".1.bin"); os._exit(0)
        first = run(corpus, 0, middle, out + ".bin")
        os.waitpid(pid, 0)
        with open(out + ".bin", "ab") as dst, open(out + ".1.bin", "rb") as src:
            while block := src.read(1 << 24):
                dst.write(block)
        result["tokens"] = os.path.getsize(out + ".bin") // 2
elif mode in ("lmlab", "second"):
    from types import SimpleNamespace
    from lmlab.data.pretrain_data import build_packed_data
    from lmlab.data.store import StoreProgress, prepare_store
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.recipe import DataConfig, SourceSpec
    from lmlab.stages.preflight import check_source
    tokenizer = load_tokenizer(tok_dir)
    began = time.perf_counter()
    if mode == "lmlab":
        store = prepare_store(SourceSpec(kind="jsonl", path=corpus), tokenizer, 0.001, 0, num_proc,
                              StoreProgress(quiet=True))
        result["tokens"] = store.meta["train"]["tokens"] + store.meta["validation"]["tokens"]
        result["disk_bytes"] = sum(p.stat().st_size for p in store.path.iterdir() if p.suffix in (".bin", ".idx"))
    else:  # a second run of a stage: its preflight and its rows, from the store the first run built
        data = DataConfig(train={"kind": "jsonl", "path": corpus}, seq_len=1024, validation_fraction=0.001)
        check_source(data.train[0], SimpleNamespace(stage="pretrain", seed=0, data=data))
        packed = build_packed_data(data, tokenizer, 0, 16)
        result["tokens"] = packed.train_tokens
elif mode == "stream":
    from lmlab.data.pretrain_data import build_packed_data
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.recipe import DataConfig
    tokenizer = load_tokenizer(tok_dir)
    data = DataConfig(train={"kind": "jsonl", "path": corpus}, seq_len=1024, validation_fraction=0.001,
                      streaming=True)
    packed = build_packed_data(data, tokenizer, 0, 16)
    began = time.perf_counter()
    result["tokens"] = sum(len(row["input_ids"]) for row in packed.train)
result["seconds"] = time.perf_counter() - began
result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
result["worker_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(result))
'''


def python_sources(limit_bytes: int) -> list[str]:
    """Real text that every machine with these packages has: their .py files, sorted."""
    import site

    roots = [Path(p) for p in site.getsitepackages()]
    texts, total = [], 0
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if 200 < len(text) < 200_000:
                texts.append(text)
                total += len(text)
            if total >= limit_bytes:
                return texts
    return texts


def write_corpus(path: Path, texts: list[str], size_mb: int) -> None:
    target = size_mb * 1_000_000
    with open(path, "w") as fh:
        while fh.tell() < target:
            for text in texts:
                fh.write(json.dumps({"text": text}) + "\n")
                if fh.tell() >= target:
                    break


def measure(mode: str, corpus: Path, tok_dir: Path, workdir: Path, num_proc: int, cache: Path) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "LMLAB_CACHE": str(cache)}
    out = workdir / f"bare-{num_proc}"
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(corpus), str(tok_dir), str(out), str(num_proc)],
                          env=env, capture_output=True, text=True, check=True)
    for leftover in workdir.glob("bare-*.bin"):
        leftover.unlink()
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=16384)
    args = parser.parse_args()

    from lmlab.data.tokenizer import save_tokenizer, train_tokenizer
    from lmlab.paths import remove_tree

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        texts = python_sources(60_000_000)
        print(f"corpus: {len(texts):,} Python files ({sum(map(len, texts)) / 1e6:.0f} MB of source), repeated")
        tok_dir = workdir / "tokenizer"
        save_tokenizer(train_tokenizer(iter(texts), vocab_size=args.vocab, max_bytes=20_000_000), tok_dir)
        results: dict[str, dict] = {}
        for size in args.sizes_mb:
            corpus = workdir / f"corpus-{size}mb.jsonl"
            write_corpus(corpus, texts, size)
            for num_proc in (1, 2):
                rates = {"bare": [], "lmlab": []}
                for round_ in range(args.rounds):
                    for side in (("lmlab", "bare") if round_ % 2 == 0 else ("bare", "lmlab")):
                        cache = workdir / "cache"
                        if cache.exists():
                            remove_tree(cache, workdir)
                        r = measure(side, corpus, tok_dir, workdir, num_proc, cache)
                        rates[side].append(r["tokens"] / r["seconds"])
                        results[f"{side}-{size}-{num_proc}"] = r
                        print(f"{size} MB, num_proc {num_proc}, {side}: {r['tokens']:,} tokens in "
                              f"{r['seconds']:.1f} s ({r['tokens'] / r['seconds'] / 1e6:.2f}M tok/s), peak RSS "
                              f"{r['peak_rss_mb']:.0f} MB (workers {r['worker_peak_rss_mb']:.0f} MB)", flush=True)
                results[f"ratio-{size}-{num_proc}"] = {"ratio": max(rates["lmlab"]) / max(rates["bare"]),
                                                       "best": {k: max(v) for k, v in rates.items()}}
            second = measure("second", corpus, tok_dir, workdir, 1, workdir / "cache")
            results[f"second-{size}"] = second
            lm = results[f"lmlab-{size}-2"]
            results[f"bytes-{size}"] = {"per_token": lm["disk_bytes"] / lm["tokens"]}
            if size == min(args.sizes_mb):
                stream = measure("stream", corpus, tok_dir, workdir, 1, workdir / "cache")
                store_rate = results[f"lmlab-{size}-1"]["tokens"] / results[f"lmlab-{size}-1"]["seconds"]
                results["stream"] = {"rate": stream["tokens"] / stream["seconds"], "ratio":
                                     stream["tokens"] / stream["seconds"] / store_rate}
            corpus.unlink()
        for size in args.sizes_mb:
            for num_proc in (1, 2):
                for side in ("bare", "lmlab"):  # each side's best round
                    best = results[f"ratio-{size}-{num_proc}"]["best"][side]
                    print(f"{side}_tokens_per_s_{size}mb_np{num_proc}: {best:.0f}")
                print(f"ratio_{size}mb_np{num_proc}: {results[f'ratio-{size}-{num_proc}']['ratio']:.3f}")
            print(f"lmlab_peak_rss_mb_{size}mb: {results[f'lmlab-{size}-1']['peak_rss_mb']:.0f}")
            print(f"lmlab_np2_peak_rss_mb_{size}mb: {results[f'lmlab-{size}-2']['peak_rss_mb']:.0f} "
                  f"(workers {results[f'lmlab-{size}-2']['worker_peak_rss_mb']:.0f})")
            print(f"bytes_per_token_{size}mb: {results[f'bytes-{size}']['per_token']:.3f}")
            print(f"second_run_data_seconds_{size}mb: {results[f'second-{size}']['seconds']:.2f}")
        if len(args.sizes_mb) > 1:
            small, large = min(args.sizes_mb), max(args.sizes_mb)
            growth = results[f"lmlab-{large}-1"]["peak_rss_mb"] - results[f"lmlab-{small}-1"]["peak_rss_mb"]
            print(f"peak_rss_growth_mb_{small}_to_{large}mb: {growth:.0f}")
        if "stream" in results:
            print(f"streaming_tokens_per_s: {results['stream']['rate']:.0f}")
            print(f"streaming_ratio: {results['stream']['ratio']:.3f}")
        print(f"ratio: {min(v['ratio'] for k, v in results.items() if k.startswith('ratio-')):.3f}")


if __name__ == "__main__":
    main()
