"""Byte-level BPE tokenizers trained with `tokenizers`, saved as HF tokenizers, and measured.

Digits are split one per token (Smol Training Playbook: arithmetic generalises
better when numbers are not chunked arbitrarily), every byte is encodable, and
the ChatML chat template keeps system messages and marks assistant content with
`{% generation %}` so TRL can put the loss on assistant tokens only.

Special tokens: `<|endoftext|>` is EOS and document separator; `<|pad|>` pads
(a separate id, so padding never looks like an end of text); no BOS is added.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from lmlab.errors import LmlabError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
SPECIAL_TOKENS = [EOS, PAD, *CHAT_TOKENS]
WORD = re.compile(r"\S+")  # a word, for fertility: a maximal run of non-whitespace


def chat_template(name: str = "chatml") -> str:
    """A shipped chat template: `chatml` or `chatml_think` (hybrid think / no-think)."""
    try:
        return resources.files("lmlab.data").joinpath("templates", f"{name}.jinja").read_text()
    except FileNotFoundError:
        raise LmlabError(f"unknown chat template '{name}'", hint="use chatml or chatml_think") from None


def _bounded(texts: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    seen = 0
    for text in texts:
        if max_bytes is not None and seen >= max_bytes:
            return
        seen += len(text.encode("utf-8"))
        yield text


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2,
                    max_bytes: int | None = None, template: str = "chatml") -> "PreTrainedTokenizerFast":
    """Train a byte-level BPE on `texts` (at most `max_bytes` of them) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

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
    if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS) + 256:
        raise LmlabError("the tokenizer training text is empty or too small to learn any merge")
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD, unk_token=None,
                                      additional_special_tokens=CHAT_TOKENS, model_max_length=1_000_000)
    wrapped.chat_template = chat_template(template)
    return wrapped


def save_tokenizer(tokenizer: "PreTrainedTokenizerFast", out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(path: str | Path) -> "PreTrainedTokenizerFast":
    """An HF tokenizer from a local directory (never remote code)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir() or not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        raise LmlabError("no tokenizer here (tokenizer.json / tokenizer_config.json missing)", file=str(path),
                         hint="train one with `lmlab tokenizer train` or point to a checkpoint saved with its tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_metrics(tokenizer, texts: Iterable[str]) -> dict[str, float | int]:
    """Fertility, continued words and compression, as the Smol Training Playbook defines them.

    A word is a maximal run of non-whitespace (`\\S+`). Each word is tokenised on its
    own, with a leading space when it followed whitespace in the text, which is how a
    byte-level BPE sees it in running text.
      fertility        = tokens over all words / number of words
      continued_words  = share of words split into more than one token
      bytes_per_token  = UTF-8 bytes of the texts / tokens of the texts (whole-text encoding)
    """
    words = tokens_in_words = continued = total_bytes = total_tokens = 0
    for text in texts:
        total_bytes += len(text.encode("utf-8"))
        total_tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        pieces = [(" " if m.start() > 0 and text[m.start() - 1].isspace() else "") + m.group()
                  for m in WORD.finditer(text)]
        if not pieces:
            continue
        counts = [len(ids) for ids in tokenizer(pieces, add_special_tokens=False)["input_ids"]]
        words += len(counts)
        tokens_in_words += sum(counts)
        continued += sum(1 for c in counts if c > 1)
    if words == 0 or total_tokens == 0:
        raise LmlabError("no words to measure the tokenizer on")
    return {"fertility": tokens_in_words / words, "continued_words": continued / words,
            "bytes_per_token": total_bytes / total_tokens, "words": words, "tokens": total_tokens,
            "bytes": total_bytes}


def compare_tokenizers(first, second, texts: Iterable[str]) -> dict[str, dict]:
    """Both metric sets and first/second ratios (fertility < 1 means the first splits words less)."""
    texts = list(texts)
    a, b = tokenizer_metrics(first, texts), tokenizer_metrics(second, texts)
    ratios = {k: a[k] / b[k] for k in ("fertility", "continued_words", "bytes_per_token") if b[k]}
    return {"first": a, "second": b, "ratios": ratios}
