"""Text tokenizers with the pipeline's special tokens.

`SentencePieceTokenizer` loads a sentencepiece `.model` (Llama/Vicuna-style and other sentencepiece
LLMs, or a tiny model trained by `train_sentencepiece` for tests). `HFTokenizerFile` loads a Hugging Face
`tokenizer.json` (Qwen2-style BPE) when the optional `tokenizers` package is installed.

Special tokens (the media placeholder `<image>`, the frame separator, chat-template markers such as
`<|im_start|>`) are never split by the underlying model: text is cut at them first. A special token the
model's vocabulary lacks gets an id appended after the vocabulary, so `vocab_size` grows and the LLM's
embedding table must be sized from it.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

from megatron_longvila.errors import DataError

IMAGE_TOKEN = "<image>"
"""The token every visual-token position carries; the model replaces its embedding."""
FRAME_SEP_TOKEN = "<frame_sep>"
"""Optional token after each frame's visual tokens."""
DEFAULT_SPECIAL_TOKENS = (IMAGE_TOKEN, FRAME_SEP_TOKEN, "<|im_start|>", "<|im_end|>")
VILA_TOKENS = ("<vila/sentinel>", "<image>", "<vila/video>")
"""VILA's three special tokens, appended after the stored vocabulary in this order by VILA's loader."""


class _SpecialTokenMixin:
    """Splits text at special tokens and maps them to ids; subclasses supply `_encode_plain`."""

    def _init_special(self, special_tokens: Iterable[str], base_vocab: int, lookup) -> None:
        self.special_tokens: dict[str, int] = {}
        next_id = base_vocab
        for tok in special_tokens:
            existing = lookup(tok)
            if existing is None:
                existing, next_id = next_id, next_id + 1
            self.special_tokens[tok] = existing
        self._vocab_size = next_id
        self._id_to_special = {v: k for k, v in self.special_tokens.items()}
        pattern = "|".join(re.escape(t) for t in sorted(self.special_tokens, key=len, reverse=True))
        self._special_re = re.compile(f"({pattern})") if pattern else None

    @property
    def vocab_size(self) -> int:
        """Ids in use, special tokens included: size the embedding table from this."""
        return self._vocab_size

    def token_id(self, token: str) -> int:
        if token not in self.special_tokens:
            raise KeyError(f"{token!r} is not a special token of this tokenizer ({sorted(self.special_tokens)})")
        return self.special_tokens[token]

    @property
    def image_token_id(self) -> int:
        return self.token_id(IMAGE_TOKEN)

    @property
    def frame_sep_token_id(self) -> int:
        return self.token_id(FRAME_SEP_TOKEN)

    def encode(self, text: str) -> list[int]:
        """Text -> ids, special tokens kept whole. No BOS/EOS: the chat template adds what it needs.

        Raises DataError("undecodable_text") for text that is not a str or cannot be encoded as UTF-8.
        """
        if not isinstance(text, str):
            raise DataError("undecodable_text", f"expected text, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates from a bad JSON escape
            raise DataError("undecodable_text", f"text is not valid Unicode ({e.reason})") from None
        if self._special_re is None:
            return self._encode_plain(text)
        ids: list[int] = []
        for piece in self._special_re.split(text):
            if not piece:
                continue
            special = self.special_tokens.get(piece)
            ids.extend([special] if special is not None else self._encode_plain(piece))
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError


class SentencePieceTokenizer(_SpecialTokenMixin):
    """A sentencepiece model plus the pipeline's special tokens.

    Args:
        model_file: path to a sentencepiece `.model` file (e.g. Llama-2's `tokenizer.model`).
        special_tokens: tokens that must stay whole; reused from the model's vocabulary when present there
            as single pieces, appended after it otherwise.
    """

    def __init__(self, model_file: str | os.PathLike, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS):
        import sentencepiece as spm

        model_file = os.fspath(model_file)
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"sentencepiece model not found: {model_file}")
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        unk = self.sp.unk_id()

        def lookup(tok: str):
            i = self.sp.piece_to_id(tok)
            return i if i != unk and self.sp.id_to_piece(i) == tok else None

        self._init_special(special_tokens, self.sp.get_piece_size(), lookup)
        # Models trained with a dummy prefix put "▁" before every encoded string, so each template
        # segment would start with a spurious space. Encode behind a sentinel and drop it (the way
        # Hugging Face's non-legacy Llama tokenizer does).
        self._sentinel = self.sp.id_to_piece(unk) if unk >= 0 else None
        self._sentinel_ids = list(self.sp.encode(self._sentinel)) if self._sentinel else []
        self._sentinel_text = self.sp.decode(self._sentinel_ids) if self._sentinel else ""
        self._dummy_prefix = bool(self._sentinel) and self.sp.encode("x", out_type=str)[0].startswith("\u2581")

    @property
    def bos_id(self) -> int | None:
        i = self.sp.bos_id()
        return i if i >= 0 else None

    @property
    def eos_id(self) -> int | None:
        i = self.sp.eos_id()
        return i if i >= 0 else None

    @property
    def pad_id(self) -> int:
        i = self.sp.pad_id()
        return i if i >= 0 else (self.eos_id if self.eos_id is not None else 0)

    def _encode_plain(self, text: str) -> list[int]:
        if self._dummy_prefix:
            ids = list(self.sp.encode(self._sentinel + text, out_type=int))
            n = len(self._sentinel_ids)
            if ids[:n] == self._sentinel_ids:
                return ids[n:]
        return list(self.sp.encode(text, out_type=int))

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], []
        for i in [int(i) for i in ids] + [None]:
            if i is None or (i in self._id_to_special and i >= self.sp.get_piece_size()):
                if run:
                    out.append(self._decode_plain(run))
                    run = []
                if i is not None:
                    out.append(self._id_to_special[i])
            else:
                run.append(i)
        return "".join(out)

    def _decode_plain(self, ids: list[int]) -> str:
        if not self._dummy_prefix:
            return self.sp.decode(ids)
        # Decoding drops a leading space as the dummy prefix: decode behind the sentinel to keep it.
        text = self.sp.decode(self._sentinel_ids + ids)
        return text[len(self._sentinel_text):] if text.startswith(self._sentinel_text) else self.sp.decode(ids)


class HFTokenizerFile(_SpecialTokenMixin):
    """A Hugging Face `tokenizer.json` (e.g. Qwen2's byte-level BPE); needs `pip install tokenizers`."""

    def __init__(self, tokenizer_json: str | os.PathLike, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
                 *, eos_token: str | None = "<|im_end|>", bos_token: str | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("HFTokenizerFile needs the 'tokenizers' package: pip install tokenizers") from None
        self.tok = Tokenizer.from_file(os.fspath(tokenizer_json))
        self._base_vocab = self.tok.get_vocab_size(with_added_tokens=True)
        self._init_special(special_tokens, self._base_vocab, self.tok.token_to_id)
        self.bos_id = self.tok.token_to_id(bos_token) if bos_token else None
        self.eos_id = self.tok.token_to_id(eos_token) if eos_token else None
        self.pad_id = self.eos_id if self.eos_id is not None else 0

    def _encode_plain(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        # Ids appended after the vocabulary are unknown to `tokenizers` (it would drop them): spell those here.
        out, run = [], []
        for i in [int(i) for i in ids] + [None]:
            if i is None or i >= self._base_vocab:
                if run:
                    out.append(self.tok.decode(run, skip_special_tokens=False))
                    run = []
                if i is not None:
                    out.append(self._id_to_special.get(i, ""))
            else:
                run.append(i)
        return "".join(out)


class ByteTokenizer(_SpecialTokenMixin):
    """UTF-8 bytes as ids 0..255, then BOS=256, EOS=257, then the special tokens. Needs no model file:
    for data checks (`tools/check_data.py` without `--tokenizer`) and examples, not for real models."""

    def __init__(self, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS):
        self.bos_id, self.eos_id, self.pad_id = 256, 257, 257
        self._init_special(special_tokens, 258, lambda tok: None)

    def _encode_plain(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], bytearray()
        for i in [int(i) for i in ids]:
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(self._id_to_special.get(i, ""))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


def load_tokenizer(path: str | os.PathLike | None, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS):
    """A sentencepiece `.model` file, a `tokenizer.json`, a folder holding one of them, or None (bytes)."""
    if path is None:
        return ByteTokenizer(special_tokens)
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name), special_tokens)
        if os.path.isfile(os.path.join(path, "vocab.json")) and os.path.isfile(os.path.join(path, "merges.txt")):
            # VILA's Qwen2 releases ship the slow tokenizer's files only; rebuilding the fast one by hand would risk
            # ids that differ from transformers'.
            raise FileNotFoundError(
                f"{path} holds vocab.json and merges.txt but no tokenizer.json: write one with transformers, e.g. "
                f"python -c \"from transformers import AutoTokenizer as T; T.from_pretrained('{path}')"
                f".save_pretrained('{path}')\", then pass the folder again")
        raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {path}")
    if path.endswith(".json"):
        return HFTokenizerFile(path, special_tokens)
    return SentencePieceTokenizer(path, special_tokens)


def special_tokens_for(record=None) -> tuple:
    """The special tokens a tokenizer must carry for a checkpoint (its models.record.ModelRecord, or None), in the
    order that gives them the checkpoint's ids: VILA's three (`<vila/sentinel>`, `<image>`, `<vila/video>`,
    appended after the stored vocabulary in that order) for a converted VILA checkpoint, else the project's."""
    facts = getattr(record, "tokenizer", None) or {}
    if facts.get("sentinel_token_id") is not None:
        return tuple(VILA_TOKENS) + tuple(t for t in DEFAULT_SPECIAL_TOKENS if t not in VILA_TOKENS)
    return DEFAULT_SPECIAL_TOKENS


def load_tokenizer_for(path: str | os.PathLike | None, record=None):
    """`load_tokenizer(path)` with the special tokens of the checkpoint (its record, or None) the run starts from."""
    return load_tokenizer(path, special_tokens_for(record))


def train_sentencepiece(lines: Iterable[str], model_prefix: str | os.PathLike, *, vocab_size: int = 256,
                        model_type: str = "bpe") -> str:
    """Train a small sentencepiece model (tests, examples) and return the `.model` path.

    UNK=0, BOS=1, EOS=2 as in Llama's layout, PAD=3; byte fallback so any text encodes.
    """
    import sentencepiece as spm

    model_prefix = os.fspath(model_prefix)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines)),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        hard_vocab_limit=False,
        # Keep newlines and repeated spaces (chat templates depend on them), as Llama's model does.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
        num_threads=1,
    )
    return model_prefix + ".model"
