"""Tokenizers: characters (the sorted distinct characters of a corpus) or bytes (the 256 byte values of UTF-8).

Both turn text into ids and back, say which characters they cannot encode, stream ids back into text, and describe
themselves in a small dict that travels in every checkpoint.
"""

import codecs
from typing import Protocol


class Decoder(Protocol):
    def push(self, id: int) -> str: ...
    def flush(self) -> str: ...


class CharTokenizer:
    """Maps each distinct character of a corpus to an id: the vocabulary is the sorted set of its characters."""

    name = "chars"
    unit = "characters"

    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of text that are not in the vocabulary, sorted."""
        return sorted(set(text) - self.stoi.keys())

    def decoder(self) -> Decoder:
        return CharDecoder(self.chars)

    def state(self) -> dict:
        return {"tokenizer": self.name, "chars": self.chars}


class CharDecoder:
    def __init__(self, chars: str):
        self.chars = chars

    def push(self, id: int) -> str:
        return self.chars[id]

    def flush(self) -> str:
        return ""


class ByteTokenizer:
    """The bytes of UTF-8 text, 256 ids: any file and any prompt, nothing unknown but what UTF-8 cannot encode.

    Decoded text shows a byte sequence that is not UTF-8 as Python's backslash escapes, one `\\xNN` per byte.
    """

    name = "bytes"
    unit = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", "backslashreplace")

    def unknown(self, text: str) -> list[str]:
        """The characters UTF-8 cannot encode (lone surrogates, which only an escape such as "\\ud800" makes)."""
        return sorted({c for c in text if "\ud800" <= c <= "\udfff"})

    def decoder(self) -> Decoder:
        return ByteDecoder()

    def state(self) -> dict:
        return {"tokenizer": self.name}


class ByteDecoder:
    """Streams bytes as text: a character whose bytes arrive one by one is returned once, when it is complete."""

    def __init__(self):
        self.utf8 = codecs.getincrementaldecoder("utf-8")("backslashreplace")

    def push(self, id: int) -> str:
        return self.utf8.decode(bytes((id,)))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


Tokenizer = CharTokenizer | ByteTokenizer
TOKENIZERS = ("chars", "bytes")


def labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """One printable label per id: its character, at the first byte of a character that takes several bytes ("" at
    the others), and "?" for a byte that is no part of valid UTF-8."""
    out, start, decoder = [""] * len(ids), 0, tokenizer.decoder()
    for i, id in enumerate(ids):
        text = decoder.push(id)
        if text:
            out[start] = text if len(text) == 1 else "?"
            start = i + 1
    return out


def empty_prompt(tokenizer: Tokenizer) -> str:
    """What a sample starts from when given no prompt: a newline, like a new speech, or the vocabulary's first
    character for a text without newlines."""
    return "\n" if not tokenizer.unknown("\n") else tokenizer.decode([0])


def tokenizer_from_state(state) -> Tokenizer:
    """The tokenizer a checkpoint describes (checkpoints from before the byte tokenizer hold only "chars").

    Raises ValueError, with what is wrong, for anything that is not a tokenizer charlm wrote.
    """
    if not isinstance(state, dict):
        raise ValueError(f"its tokenizer is a {type(state).__name__}, not a mapping")
    name = state.get("tokenizer", "chars")
    if name == "bytes":
        return ByteTokenizer()
    if name != "chars":
        raise ValueError(f"its tokenizer {name!r} is not one of {TOKENIZERS}")
    chars = state.get("chars")
    if not isinstance(chars, str) or not chars:
        raise ValueError("its vocabulary is missing or not a string of characters")
    if any(a >= b for a, b in zip(chars, chars[1:])):
        raise ValueError("its vocabulary is not a sorted set of distinct characters")
    return CharTokenizer(chars)


def visible(char: str) -> str:
    """A character as it can be seen in a terminal: a space as ␣, a newline as \\n, other invisible ones escaped."""
    if char in ("\n", "\t", "\r", " "):
        return {"\n": "\\n", "\t": "\\t", "\r": "\\r", " ": "␣"}[char]
    return char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
