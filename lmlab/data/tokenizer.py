"""Byte-level BPE tokenizers trained with `tokenizers`, saved as HF tokenizers, and measured.

Digits are split one per token (Smol Training Playbook: numbers are not chunked
arbitrarily, which helps arithmetic), every byte is encodable (the 256-byte
alphabet is always in the vocabulary, so there is no unknown token), and the
ChatML chat template keeps system messages and marks assistant content with
`{% generation %}` so TRL can put the loss on assistant tokens only.

Special tokens, at ids 0-5 in this order:
  `<|endoftext|>`  EOS and document separator; no BOS is added (pretraining packs
                   documents joined by EOS, the GPT-2 / Qwen convention).
  `<|pad|>`        its own id, so padding is never mistaken for an end of text and
                   a collator that masks pad labels never hides a real EOS.
  `<|im_start|>`, `<|im_end|>`  ChatML turns; special, so skipped when decoding.
  `<think>`, `</think>`  single ids but *not* special (as in Qwen3): decoding with
                   `skip_special_tokens=True` keeps them, so answer extraction can
                   still find where the reasoning ends.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from lmlab.errors import LmlabError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from lmlab.recipe import Recipe

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]
SPECIAL_TOKENS = [EOS, PAD, *CHAT_TOKENS, *THINK_TOKENS]
BYTE_ALPHABET = 256
# The context length belongs to the model config; this only keeps transformers from warning
# about long documents that are tokenized whole and packed afterwards.
MODEL_MAX_LENGTH = 1_000_000
# A word, for fertility: a run of letters/digits/underscore, or a run of punctuation/symbols,
# so "end." is two words and punctuation does not count as a split of the word before it.
WORD = re.compile(r"\w+|[^\w\s]+")


def chat_template(name: str = "chatml") -> str:
    """A shipped chat template: `chatml`, or `chatml_think` (hybrid think / no-think via `enable_thinking`)."""
    templates = resources.files("lmlab.data").joinpath("templates")
    source = templates.joinpath(f"{name}.jinja")
    if "/" in name or "\\" in name or not source.is_file():
        names = sorted(p.name.removesuffix(".jinja") for p in templates.iterdir() if p.name.endswith(".jinja"))
        raise LmlabError(f"unknown chat template '{name}'", field="chat_template",
                         hint=f"use one of {', '.join(names)}")
    return source.read_text(encoding="utf-8")


TURN_PROBE = "lmlab-end-of-turn-probe"


def end_of_turn_ids(tokenizer) -> list[int]:
    """EOS and the special token the chat template closes an assistant turn with (`<|im_end|>`,
    `<|eot_id|>`, `<end_of_turn>`...), found by rendering a probe turn: what a generation config
    must list so transformers and vLLM stop where the turn ends."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": TURN_PROBE}], tokenize=False)
        except Exception:  # a template that needs other roles or fields: EOS is all that is known
            text = ""
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        tail = text.split(TURN_PROBE, 1)[1] if TURN_PROBE in text else ""
        closing = [i for i in tokenizer.encode(tail, add_special_tokens=False) if i in special][:1]
        ids += closing
    return list(dict.fromkeys(ids))


def _bounded(texts: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    """The texts up to `max_bytes` UTF-8 bytes in all; the source is not read past the text that fills the budget."""
    if max_bytes is None:
        yield from texts
        return
    left = max_bytes
    for text in texts:
        data = text.encode("utf-8")
        if len(data) >= left:  # cut the last text so one huge document cannot blow the budget
            yield data[:left].decode("utf-8", errors="ignore")
            return
        left -= len(data)
        yield text


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2,
                    max_bytes: int | None = None, template: str = "chatml") -> "PreTrainedTokenizerFast":
    """Train a byte-level BPE on `texts` (at most `max_bytes` of them) and wrap it for transformers.

    `vocab_size` counts everything: the 6 special tokens, the 256 bytes and the merges.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    floor = len(SPECIAL_TOKENS) + BYTE_ALPHABET
    if vocab_size <= floor:
        raise LmlabError(f"vocab_size {vocab_size} leaves no room for merges", field="tokenizer.vocab_size",
                         hint=f"use more than {floor} ({len(SPECIAL_TOKENS)} special tokens + {BYTE_ALPHABET} bytes)")
    if max_bytes is not None and max_bytes <= 0:
        raise LmlabError(f"max_bytes must be positive, got {max_bytes}", field="tokenizer.max_train_bytes")
    chat = chat_template(template)  # an unknown template fails before training

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_bounded(texts, max_bytes), trainer=trainer)
    if tokenizer.get_vocab_size() <= floor:
        raise LmlabError("the tokenizer training text is empty or too small to learn any merge",
                         hint="give more text or lower tokenizer.min_frequency")
    # Same ids, flag flipped: the think tags survive skip_special_tokens (see the module docstring).
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD, unk_token=None,
                                      bos_token=None, additional_special_tokens=CHAT_TOKENS,
                                      model_max_length=MODEL_MAX_LENGTH, clean_up_tokenization_spaces=False)
    wrapped.chat_template = chat
    return wrapped


def save_tokenizer(tokenizer: "PreTrainedTokenizerFast", out_dir: str | Path) -> Path:
    """Write an HF tokenizer directory that plain `AutoTokenizer.from_pretrained` loads, chat template included."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)  # transformers 5 writes the template to chat_template.jinja
    return out_dir


def load_tokenizer(path: str | Path) -> "PreTrainedTokenizerFast":
    """An HF tokenizer from a local directory, never running remote code.

    A tokenizer without a pad token gets EOS as pad, so batching works with third-party tokenizers.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir() or not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        raise LmlabError("no tokenizer here (tokenizer.json / tokenizer_config.json missing)", file=str(path),
                         hint="train one with `lmlab tokenizer train`, or give a checkpoint saved with its tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # a corrupt or foreign directory is bad input, not a crash
        raise LmlabError(f"cannot load the tokenizer: {type(exc).__name__}: {exc}", file=str(path),
                         hint="save it with save_pretrained (tokenizer.json + tokenizer_config.json)") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokens_per_word(offsets: list[tuple[int, int]], starts: list[int], ends: list[int]) -> list[int]:
    """For each word span, how many tokens' character spans overlap it."""
    counts = [0] * len(starts)
    for start, end in offsets:
        if end <= start:
            continue
        w = bisect_right(ends, start)  # the first word that ends after this token starts
        while w < len(starts) and starts[w] < end:
            counts[w] += 1
            w += 1
    return counts


def tokenizer_metrics(tokenizer, texts: Iterable[str], batch_size: int = 256) -> dict[str, float | int]:
    """Fertility, continued words and compression, as the Smol Training Playbook uses them to compare tokenizers.

    Each text is tokenized whole (no special tokens), and each word is charged the tokens
    whose character spans overlap it in that encoding: its tokens *in context*, whatever
    the tokenizer does with spaces (byte-level "Ġword", metaspace "▁word"). Tokens that
    cover only whitespace belong to no word; a token straddling two words counts for both.
      word             = a match of `\\w+|[^\\w\\s]+` (a run of letters/digits/_, or a run of
                         punctuation/symbols); scripts written without spaces count a whole
                         run as one word
      fertility        = tokens charged to words / words
      continued_words  = share of words charged more than one token
      bytes_per_token  = UTF-8 bytes of the texts / tokens of the texts
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LmlabError("tokenizer metrics need a fast (Rust `tokenizers`) tokenizer for character offsets",
                         hint="save the tokenizer with a tokenizer.json")
    words = word_tokens = continued = total_bytes = total_tokens = 0

    def measure(batch: list[str]) -> None:
        nonlocal words, word_tokens, continued, total_bytes, total_tokens
        for text, encoding in zip(batch, backend.encode_batch(batch, add_special_tokens=False)):
            total_bytes += len(text.encode("utf-8"))
            total_tokens += len(encoding.ids)
            spans = [m.span() for m in WORD.finditer(text)]
            counts = _tokens_per_word(encoding.offsets, [s for s, _ in spans], [e for _, e in spans])
            words += len(counts)
            word_tokens += sum(counts)
            continued += sum(1 for c in counts if c > 1)

    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            measure(batch)
            batch = []
    if batch:
        measure(batch)
    if words == 0 or total_tokens == 0:
        raise LmlabError("no words to measure the tokenizer on", hint="give non-empty texts")
    return {"fertility": word_tokens / words, "continued_words": continued / words,
            "bytes_per_token": total_bytes / total_tokens, "words": words, "tokens": total_tokens,
            "bytes": total_bytes}


def compare_tokenizers(first, second, texts: Iterable[str]) -> dict[str, dict]:
    """Both metric sets on the same texts and first/second ratios.

    A fertility ratio below 1 means the first splits words less; a bytes_per_token ratio
    above 1 means it compresses better. A ratio with a zero denominator is NaN.
    """
    texts = list(texts)
    a, b = tokenizer_metrics(first, texts), tokenizer_metrics(second, texts)
    keys = ("fertility", "continued_words", "bytes_per_token", "tokens")
    ratios = {k: a[k] / b[k] if b[k] else float("nan") for k in keys}
    return {"first": a, "second": b, "ratios": ratios}


def tokenizer_dir(recipe: Recipe, run_dir: Path) -> tuple[Path, bool]:
    """Where the recipe's tokenizer is, and whether it is the run's own: a given directory, the checkpoint's,
    the teacher's for a fresh distillation student, or else the run's `tokenizer/` (trained there on first use)."""
    given = recipe.tokenizer.path or recipe.model.from_pretrained or \
        (recipe.distill.teacher if recipe.stage == "distill" else None)  # a fresh student speaks the teacher's tokens
    return (Path(given), False) if given else (run_dir / "tokenizer", True)


def resolve_tokenizer(recipe: Recipe, run_dir: Path):
    """The recipe's tokenizer (`tokenizer_dir`), trained and saved first when it is the run's own."""
    from lmlab.console import console
    from lmlab.distributed import main_first

    saved, own = tokenizer_dir(recipe, run_dir)
    if not own:
        return load_tokenizer(saved)
    with main_first() as main:  # rank 0 trains and saves it; the other ranks load what it saved
        if main and not (saved / "tokenizer.json").is_file():  # else: trained by an earlier (interrupted) run
            from lmlab.data.pretrain_data import load_documents

            specs = recipe.tokenizer.train_sources or recipe.data.train
            texts = (row["text"] for row in load_documents(specs, streaming=True, seed=recipe.seed))
            with console(stderr=True).status(f"training a byte-level BPE tokenizer "
                                             f"({recipe.tokenizer.vocab_size} tokens)"):
                tokenizer = train_tokenizer(texts, vocab_size=recipe.tokenizer.vocab_size,
                                            min_frequency=recipe.tokenizer.min_frequency,
                                            max_bytes=recipe.tokenizer.max_train_bytes)
            save_tokenizer(tokenizer, saved)
    return load_tokenizer(saved)


def measure_tokenizers(paths: list, source: str, docs: int) -> tuple[dict[str, dict], dict | None, int]:
    """`lmlab tokenizer eval`: each tokenizer's metrics on the first `docs` documents of a source, and the
    first-over-second ratios when there are two; returns (metrics by path, ratios or None, documents read)."""
    from lmlab.data.sources import load_source
    from lmlab.recipe import SourceSpec

    texts = [row["text"] for row in load_source(SourceSpec.model_validate(source), streaming=True).take(docs)]
    tokenizers = {str(path): load_tokenizer(path) for path in paths}
    results = {name: tokenizer_metrics(tok, texts) for name, tok in tokenizers.items()}
    ratios = None
    if len(tokenizers) == 2:
        compared = compare_tokenizers(*tokenizers.values(), texts)
        ratios = compared.get("ratios", compared)
    return results, ratios, len(texts)

