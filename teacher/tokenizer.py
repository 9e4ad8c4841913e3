"""Prompt cleaning and the two text tokenizers of the project.

- ``UMT5Tokenizer``: the ``google/umt5-xxl`` tokenizer that ships inside a Wan checkpoint folder,
  read from its ``tokenizer.json`` with the ``tokenizers`` library (no network, no transformers).
- ``ByteTokenizer``: UTF-8 bytes, for the embedded shapes-world teacher, whose captions are
  English and Chinese.

Both clean the text the official way, append EOS, truncate and pad to ``text_len`` and return
``(ids, mask)`` [B, text_len] int64, equal to what transformers' T5 tokenizer returns for
``padding='max_length', truncation=True, add_special_tokens=True`` (reference ``wan22-a14b.md``
section 1.1).
"""

from __future__ import annotations

import html
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import ftfy
import torch
from tokenizers import Tokenizer

from teacher.weight_files import write_text_atomic

PAD_ID = 0
EOS_ID = 1
TOKENIZER_JSON = "tokenizer.json"
BYTE_MARKER = "byte_tokenizer.json"
_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """The official 'whitespace' prompt cleaning.

    ``ftfy.fix_text`` repairs mojibake and odd Unicode; ``html.unescape`` runs twice because
    scraped captions are often escaped twice (``&amp;amp;``); whitespace runs (newlines, tabs,
    ideographic spaces) become one space and the ends are stripped.
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = text.strip()
    return _WHITESPACE.sub(" ", text).strip()


class TextTokenizer(ABC):
    """What the pipeline needs from a tokenizer; the batching rules live here, once.

    Subclasses only turn one cleaned string into content ids (no special tokens).
    """

    pad_id: int = PAD_ID
    eos_id: int = EOS_ID

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the text encoder's embedding must have."""

    @abstractmethod
    def encode_content(self, text: str) -> list[int]:
        """Ids of an already cleaned string, without EOS, untruncated."""

    @abstractmethod
    def save(self, folder: str | Path) -> Path:
        """Write what ``load_tokenizer(folder)`` needs to rebuild this tokenizer; returns folder."""

    def __call__(self, texts: Sequence[str], text_len: int = 512, *,
                 allow_empty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize a batch of prompts.

        Args:
            texts: prompts (raw; cleaned here with ``clean_text``).
            text_len: every row is truncated or padded to this length; EOS is kept as the last
                token when truncating (content is cut to ``text_len - 1``), as HF T5 does.
            allow_empty: a prompt that is empty after cleaning raises ValueError unless this is
                True; then it encodes to EOS alone, as the official pipeline does for an empty
                negative prompt.
        Returns:
            ids [B, text_len] int64 (pad id 0 after EOS id 1), mask [B, text_len] int64 (1 on
            content and EOS, 0 on padding).
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, got one string; wrap it: [prompt]")
        if text_len < 1:
            raise ValueError(f"text_len={text_len} must be >= 1 (room for EOS)")
        ids = torch.full((len(texts), text_len), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(texts), text_len), dtype=torch.int64)
        for row, raw in enumerate(texts):
            if not isinstance(raw, str):
                raise TypeError(f"prompt #{row} is {type(raw).__name__}, not str")
            text = clean_text(raw)
            if not text and not allow_empty:
                raise ValueError(
                    f"prompt #{row} ({raw!r}) is empty after cleaning; give a non-empty prompt, "
                    f"or pass allow_empty=True for an intentionally empty one (e.g. a negative "
                    f"prompt), which encodes to EOS alone"
                )
            content = self.encode_content(text)[: text_len - 1] if text else []
            tokens = content + [self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
            mask[row, : len(tokens)] = 1
        return ids, mask


class UMT5Tokenizer(TextTokenizer):
    """The umT5 SentencePiece-Unigram tokenizer, read from ``tokenizer.json``.

    Only the vocabulary, normaliser and pre-tokeniser of the file are used; EOS, truncation and
    padding are applied by ``TextTokenizer.__call__`` so that settings baked into the file cannot
    change them. ``from_dir`` checks that the file's post-processor agrees (appends ``</s>``).
    """

    def __init__(self, tokenizer: Tokenizer, source: str = "<memory>"):
        self._tokenizer = tokenizer
        self._source = source
        # Truncation/padding stored in a tokenizer.json would apply inside encode(); the batching
        # rules are ours, so switch them off.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        for token, expected in (("<pad>", PAD_ID), ("</s>", EOS_ID)):
            found = tokenizer.token_to_id(token)
            if found != expected:
                raise ValueError(
                    f"{source}: token {token!r} has id {found}, but umT5/T5 needs id {expected}; "
                    f"this is not a T5-family tokenizer"
                )
        probe = tokenizer.encode("a", add_special_tokens=False).ids
        with_specials = tokenizer.encode("a", add_special_tokens=True).ids
        if with_specials not in (probe, probe + [EOS_ID]):
            raise ValueError(
                f"{source}: its post-processor turns {probe} into {with_specials}; a T5 tokenizer "
                f"appends only </s> (id {EOS_ID}). Use the google/umt5-xxl tokenizer.json"
            )

    @classmethod
    def from_dir(cls, folder: str | Path) -> UMT5Tokenizer:
        """Load ``<folder>/tokenizer.json`` (e.g. ``<ckpt>/google/umt5-xxl``); never the network.

        A folder with only the SentencePiece ``spiece.model`` is rejected with the one-line command
        that writes ``tokenizer.json`` from it (transformers' converter), instead of converting
        here: the conversion rules belong to transformers and must not be re-implemented silently.
        """
        folder = Path(folder)
        path = folder / TOKENIZER_JSON
        if not path.is_file():
            if (folder / "spiece.model").is_file():
                raise FileNotFoundError(
                    f"{folder} has spiece.model but no {TOKENIZER_JSON}, which UMT5Tokenizer "
                    f"reads. Create it once (needs transformers, sentencepiece and protobuf): python -c "
                    f"\"from transformers import AutoTokenizer; "
                    f"AutoTokenizer.from_pretrained('{folder}').save_pretrained('{folder}')\""
                )
            raise FileNotFoundError(
                f"{path} is missing; point to the google/umt5-xxl tokenizer folder of the "
                f"checkpoint (it holds {TOKENIZER_JSON})"
            )
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust loader raises a bare Exception on bad JSON
            raise ValueError(f"{path} is not a valid tokenizers file ({err}); re-download it") from None
        return cls(tokenizer, source=str(path))

    @property
    def vocab_size(self) -> int:
        """Pieces plus added tokens; every id is below it. A text encoder's embedding may have
        more rows (umT5-XXL's 256384 are padded), so compare with ``<=``, not ``==``."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_content(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids -> text, skipping pad/EOS and other special tokens."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        write_text_atomic(self._tokenizer.to_str(), folder / TOKENIZER_JSON)
        return folder


class ByteTokenizer(TextTokenizer):
    """UTF-8 byte tokenizer: id = byte + offset; 0 = pad, 1 = EOS, 2..offset-1 unused.

    Any language works without a vocabulary (a Chinese character is three bytes). The default
    offset 3 leaves id 2 free as T5 keeps it for <unk>, giving vocab_size 259 (the shapes preset).
    """

    def __init__(self, offset: int = 3):
        if not isinstance(offset, int) or offset < 2:
            raise ValueError(f"offset={offset!r} must be an integer >= 2 (ids 0 and 1 are pad and EOS)")
        self.offset = offset

    @property
    def vocab_size(self) -> int:
        return 256 + self.offset

    def encode_content(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids -> text; pad/EOS/reserved ids are skipped. A multi-byte character cut by
        truncation decodes as U+FFFD."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside [0, {self.vocab_size}) of this ByteTokenizer")
        data = bytes(i - self.offset for i in ids if i >= self.offset)
        return data.decode("utf-8", errors="replace")

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        write_text_atomic(json.dumps({"kind": "byte", "offset": self.offset}), folder / BYTE_MARKER)
        return folder

    @classmethod
    def from_dir(cls, folder: str | Path) -> ByteTokenizer:
        """Read the ``byte_tokenizer.json`` marker written by ``save``."""
        path = Path(folder) / BYTE_MARKER
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is missing; write it with ByteTokenizer.save") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); rewrite it with ByteTokenizer.save") from None
        if not isinstance(spec, dict) or spec.get("kind") != "byte" or "offset" not in spec:
            raise ValueError(f'{path} must hold {{"kind": "byte", "offset": <int>}}, found {spec!r}')
        return cls(offset=spec["offset"])


def load_tokenizer(path_or_kind: str | Path) -> TextTokenizer:
    """A tokenizer from a folder (``tokenizer.json`` -> umT5, ``byte_tokenizer.json`` -> bytes)
    or from the kind name ``"byte"`` (a default ByteTokenizer)."""
    if str(path_or_kind) == "byte" and not Path(path_or_kind).exists():
        return ByteTokenizer()
    folder = Path(path_or_kind)
    if (folder / TOKENIZER_JSON).is_file():
        return UMT5Tokenizer.from_dir(folder)
    if (folder / BYTE_MARKER).is_file():
        return ByteTokenizer.from_dir(folder)
    if (folder / "spiece.model").is_file():
        return UMT5Tokenizer.from_dir(folder)  # raises, naming the file to create
    raise FileNotFoundError(
        f"{folder} holds neither {TOKENIZER_JSON} (umT5) nor {BYTE_MARKER} (byte tokenizer); "
        f"pass a tokenizer folder or the kind 'byte'"
    )
