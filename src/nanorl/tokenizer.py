"""The tokenizer: byte-level BPE trained with rustbpe, encoded with tiktoken, plus the chat format.

    tok = train_tokenizer(texts, vocab_size=2048)       # vocab_size counts the special tokens
    tok.save(dir); tok = Tokenizer.load(dir)
    ids = tok.encode("text")                             # plain text: never yields a special token
    ids, mask = tok.render_conversation(conv)            # mask 1 = trained (assistant tokens)
    ids = tok.render_for_completion(conv)                # ... ending with <|assistant_start|>

Training uses rustbpe (a Rust trainer that splits text with the regex and counts pairs in parallel); the learned
merges become a `tiktoken.Encoding`, which encodes fast and in batches across threads. Ids 0..255 are the raw
bytes, then the merges in the order they were learned, then the special tokens.

The split pattern is GPT-4's (cl100k) with one knob: the longest digit run that may become one token
(`max_digits`, 3 as in GPT-4). Numbers up to 999 can then be single tokens when the vocabulary has room, which
the offline `arith` task's numbers fit (a tiny model copies a number more easily when it is one token).

On disk (a folder, plain text, no pickle): `tokenizer.json` (pattern, special tokens, and the merges' bytes in
rank order, base64) — one file, so a half-written tokenizer is never mistaken for a whole one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from nanorl.api import Conversation, NanorlError

# GPT-4's (cl100k) split pattern, with the digit-run length as a parameter (GPT-4: 3, nanochat: 2).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,%d}"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
MAX_DIGITS = 3

# The special tokens, in id order after the merges. Documents start with <|bos|>; a chat is
# <|bos|><|user_start|>...<|user_end|><|assistant_start|>...<|assistant_end|>...; inside an assistant turn a
# tool call is <|python_start|>code<|python_end|> and the tool's answer <|output_start|>...<|output_end|>.
SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)

# The smallest vocabulary a tokenizer can have: the 256 byte tokens and the special tokens, no merge
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

FILE = "tokenizer.json"
FORMAT = "nanorl-bpe-1"


def split_pattern(max_digits: int = MAX_DIGITS) -> str:
    return SPLIT_PATTERN % max_digits


class Tokenizer:
    """A trained BPE: `mergeable_ranks` (token bytes -> id, ids 0..n-1) and the split pattern; specials follow."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str, name: str = "nanorl"):
        import tiktoken

        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise NanorlError("tokenizer ranks are not the ids 0..n-1", hint="retrain the tokenizer")
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        self.specials = {s: n + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=self.specials
        )
        self.bos_id = self.specials["<|bos|>"]
        # tiktoken's batch encoder runs a thread pool; one thread per core is all it can use
        self.threads = max(1, os.cpu_count() or 1)
        self.meta: dict[str, Any] = {}  # what it was trained on (saved along; `nanorl tokenizer info` shows)
        self._fingerprint: str | None = None

    # -- sizes and ids ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """All ids, special tokens included: the embedding table needs at least this many rows."""
        return self.enc.n_vocab

    def special_id(self, name: str) -> int:
        """The id of a special token, by full name (`<|assistant_end|>`) or short name (`assistant_end`)."""
        key = name if name.startswith("<|") else f"<|{name}|>"
        try:
            return self.specials[key]
        except KeyError:
            raise NanorlError(f"unknown special token {name!r} (known: {', '.join(SPECIAL_TOKENS)})") from None

    def is_special(self, token_id: int) -> bool:
        return token_id >= len(self.mergeable_ranks)

    def token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)

    # -- plain text -----------------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of plain text. A special token's name in the text ("<|bos|>") encodes as ordinary bytes."""
        ids = self.enc.encode_ordinary(text)
        return [self.bos_id, *ids] if bos else ids

    def encode_batch(self, texts: Sequence[str], bos: bool = False) -> list[list[int]]:
        """`encode` over many texts at once, on `self.threads` threads (tiktoken releases the GIL)."""
        out = self.enc.encode_ordinary_batch(list(texts), num_threads=self.threads)
        if bos:
            for ids in out:
                ids.insert(0, self.bos_id)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (special tokens are written by name); invalid UTF-8 becomes U+FFFD."""
        return self.enc.decode(list(ids))

    # -- chat ---------------------------------------------------------------------------------------------
    def render_conversation(self, conv: Conversation, max_len: int | None = None) -> tuple[list[int], list[int]]:
        """A conversation as token ids plus a loss mask of the same length (1: the model is trained on it).

        Trained: the assistant's text, its tool calls and its closing <|assistant_end|> (the model must learn to
        stop). Not trained: <|bos|>, user turns, <|assistant_start|>, and tool outputs (the tool writes those).
        A leading system message is folded into the first user message (the format has no system turn).
        `max_len` truncates both lists.
        """
        ids: list[int] = [self.bos_id]
        mask: list[int] = [0]

        def add(tokens: list[int], trained: int) -> None:
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        sp = self.specials
        for role, content in checked_messages(conv):
            if role == "user":
                add([sp["<|user_start|>"], *self.encode(content), sp["<|user_end|>"]], 0)
            else:  # assistant
                add([sp["<|assistant_start|>"]], 0)
                for kind, text in content:
                    if kind == "text":
                        add(self.encode(text), 1)
                    elif kind == "python":
                        add([sp["<|python_start|>"], *self.encode(text), sp["<|python_end|>"]], 1)
                    else:  # python_output: the tool wrote it, so the model is not trained to predict it
                        add([sp["<|output_start|>"], *self.encode(text), sp["<|output_end|>"]], 0)
                add([sp["<|assistant_end|>"]], 1)
        if max_len is not None:
            ids, mask = ids[:max_len], mask[:max_len]
        return ids, mask

    def render_for_completion(self, conv: Conversation) -> list[int]:
        """The prompt for sampling: the conversation without a final assistant turn, then <|assistant_start|>."""
        conv = list(conv)
        if conv and isinstance(conv[-1], dict) and conv[-1].get("role") == "assistant":
            conv = conv[:-1]
        ids, _ = self.render_conversation(conv)
        return [*ids, self.specials["<|assistant_start|>"]]

    # -- persistence ----------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """A short sha256 of what decides the token ids: the split pattern, the special tokens and every token's
        bytes in id order (not `meta`). Two tokenizers with the same fingerprint encode every text alike; a
        checkpoint records its tokenizer's, and a run refuses a model trained with another (nanorl.checkpoint)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps([FORMAT, self.pattern, list(SPECIAL_TOKENS)]).encode())
            for token, _ in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
                h.update(len(token).to_bytes(4, "little") + token)
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def save(self, directory: str | Path) -> Path:
        """Write `<dir>/tokenizer.json` atomically (temp file + rename); return its path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        by_rank = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        blob = {
            "format": FORMAT,
            "pattern": self.pattern,
            "special_tokens": list(SPECIAL_TOKENS),
            "vocab_size": self.vocab_size,
            "meta": self.meta,
            "tokens": [base64.b64encode(b).decode("ascii") for b, _ in by_rank],
        }
        path = d / FILE
        tmp = d / (FILE + ".tmp")
        tmp.write_text(json.dumps(blob))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        path = Path(directory)
        if path.is_dir():
            path = path / FILE
        if not path.is_file():
            raise NanorlError(
                f"no tokenizer at {path}",
                hint="train one: `nanorl tokenizer train --run NAME` for a run, or the pipeline's tokenizer stage",
            )
        try:
            blob = json.loads(path.read_text())
            if blob.get("format") != FORMAT:
                raise ValueError(f"format {blob.get('format')!r}, expected {FORMAT!r}")
            if tuple(blob["special_tokens"]) != SPECIAL_TOKENS:
                raise ValueError("its special tokens differ from this version's")
            ranks = {base64.b64decode(t): i for i, t in enumerate(blob["tokens"])}
            pattern = blob["pattern"]
        except (ValueError, KeyError, TypeError) as e:
            raise NanorlError(f"{path} is not a valid nanorl tokenizer: {e}", hint="retrain the tokenizer") from None
        tok = cls(ranks, pattern)
        tok.meta = dict(blob.get("meta") or {})
        return tok

    # -- diagnostics ----------------------------------------------------------------------------------------
    def bytes_per_token(self, texts: Sequence[str]) -> float:
        """Compression on a sample: UTF-8 bytes per token (higher is better)."""
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_tokens = sum(len(ids) for ids in self.encode_batch(texts))
        return n_bytes / max(1, n_tokens)

    @property
    def info(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "merges": len(self.mergeable_ranks) - 256,
            "special_tokens": dict(self.specials),
            "pattern": self.pattern,
            "fingerprint": self.fingerprint,
            **self.meta,
        }


def checked_messages(conv: Conversation) -> list[tuple[str, Any]]:
    """Each message as (role, content): a user's content a string, an assistant's its (kind, text) parts. A
    leading system message is folded into the first user message (nanochat's convention). Conversations come
    from users' files too (`data.chat`), so a malformed message is a NanorlError saying which one and why."""
    out: list[tuple[str, Any]] = []
    for n, msg in enumerate(conv, 1):
        if not isinstance(msg, dict):
            raise NanorlError(f"message {n} is not a {{'role', 'content'}} object: {str(msg)[:60]!r}")
        role = msg.get("role")
        if role is None:
            raise NanorlError(f"message {n} has no 'role'")
        if role not in ("system", "user", "assistant"):
            raise NanorlError(f"message {n}: unknown message role {role!r} (system, user or assistant)")
        if role == "system" and n > 1:
            raise NanorlError(f"message {n}: a system message may only come first")
        if "content" not in msg:
            raise NanorlError(f"message {n} ({role}) has no 'content'")
        content = msg["content"]
        if role == "assistant":
            out.append((role, list(_parts(content, f"message {n} (assistant)"))))
        elif not isinstance(content, str):
            raise NanorlError(f"message {n} ({role}): its content must be a string, not {type(content).__name__}")
        else:
            out.append((role, content))
    if out and out[0][0] == "system":
        if len(out) < 2 or out[1][0] != "user":
            raise NanorlError("a system message must be followed by a user message")
        out[:2] = [("user", f"{out[0][1]}\n\n{out[1][1]}")]
    return out


def _parts(content: Any, where: str) -> Iterator[tuple[str, str]]:
    """An assistant message's content as (kind, text) parts: a string is one text part."""
    if isinstance(content, str):
        yield "text", content
        return
    if not isinstance(content, list):
        raise NanorlError(f"{where}: its content must be a string or a list of parts, not {type(content).__name__}")
    for n, part in enumerate(content, 1):
        if not isinstance(part, dict):
            raise NanorlError(f"{where}: part {n} is not a {{'type', 'text'}} object: {str(part)[:60]!r}")
        kind = part.get("type")
        if kind not in ("text", "python", "python_output"):
            raise NanorlError(f"{where}: unknown assistant content part type {kind!r} (text, python or python_output)")
        if not isinstance(part.get("text"), str):
            raise NanorlError(f"{where}: part {n} has no string 'text'")
        yield kind, part["text"]


def _valid_unicode(text: str) -> str:
    """`text` with each lone surrogate (half of a UTF-16 pair, which JSON's "\\ud83d" escape yields from a cut emoji)
    as U+FFFD, as tiktoken encodes it; rustbpe would stop with a UnicodeEncodeError. Valid text costs one UTF-8
    encode (~18 ms per 10 M characters)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    max_digits: int = MAX_DIGITS,
    max_chars: int | None = None,
    on_chars: Callable[[int], None] | None = None,
) -> Tokenizer:
    """Train a byte-level BPE on `texts`; the result has at most `vocab_size` ids, special tokens included.

    Training stops early when the text has no pair left to merge (a small corpus), so `tok.vocab_size` can be
    smaller than asked. `max_chars` stops reading the iterator after that many characters; `on_chars(n)` is
    called with the characters of each document read (a progress bar).
    """
    import rustbpe

    n_merges = vocab_size - MIN_VOCAB_SIZE
    if n_merges < 0:
        raise NanorlError(
            f"vocab_size {vocab_size} is too small: 256 byte tokens + {len(SPECIAL_TOKENS)} special tokens",
            hint=f"use at least {MIN_VOCAB_SIZE}",
            exit_code=2,
        )
    seen = {"chars": 0, "docs": 0}

    def stream() -> Iterator[str]:
        for t in texts:
            if max_chars is not None and seen["chars"] >= max_chars:
                return
            if max_chars is not None and seen["chars"] + len(t) > max_chars:
                t = t[: max_chars - seen["chars"]]
            seen["chars"] += len(t)
            seen["docs"] += 1
            if on_chars:
                on_chars(len(t))
            yield _valid_unicode(t)

    pattern = split_pattern(max_digits)
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(stream(), 256 + n_merges, pattern=pattern)
    if seen["chars"] == 0:
        raise NanorlError("the tokenizer's training text is empty", hint="check the corpus (--corpus)")
    ranks = dict(trainer.get_mergeable_ranks())
    tok = Tokenizer(ranks, pattern)
    tok.meta = {"trained_chars": seen["chars"], "trained_docs": seen["docs"], "requested_vocab_size": vocab_size}
    return tok
