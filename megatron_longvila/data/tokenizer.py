"""Text tokenizers with the pipeline's special tokens.

`SentencePieceTokenizer` loads a sentencepiece `.model` (Llama/Vicuna-style and other sentencepiece
LLMs, or a tiny model trained by `train_sentencepiece` for tests). `HFTokenizerFile` loads a Hugging Face
`tokenizer.json` (Qwen2 or Llama-3 byte-level BPE) when the optional `tokenizers` package is installed.

Special tokens (the media placeholder `<image>`, the frame separator, chat-template markers such as
`<|im_start|>`) are never split by the underlying model: text is cut at them first. A special token the
model's vocabulary lacks gets an id appended after the vocabulary, so `vocab_size` grows and the LLM's
embedding table must be sized from it.

BOS, EOS and pad ids come from the tokenizer's own files, else from the checkpoint's record (`facts`, the
`tokenizer` dict of models.record.ModelRecord), never from a family default:
    sentencepiece   the model's bos/eos/pad pieces
    tokenizer.json  `bos_token`/`eos_token`/`pad_token` of tokenizer_config.json and special_tokens_map.json beside
                    it (both must agree where both name one), else generation_config.json's `*_token_id`.
                    Qwen2 Instruct: EOS <|im_end|>, pad <|endoftext|>, no BOS; Llama-3 Instruct: BOS
                    <|begin_of_text|>, EOS <|eot_id|>, no pad.
    bytes           BOS 256, EOS 257, pad 257
Where the files and the record both give a BOS or EOS they must agree (TokenizerError otherwise). A tokenizer
that names no pad pads with its EOS (what Hugging Face generation does for Llama-3): fillers are documents of
their own that carry no loss, so the id only has to be a real token. With neither pad nor EOS known the pad id
is 0, for the same reason; such a tokenizer cannot serve a template that needs an EOS
(`conversation.check_template` refuses it).
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Mapping, Sequence

from megatron_longvila.errors import DataError, TokenizerError

IMAGE_TOKEN = "<image>"
"""The token every visual-token position carries; the model replaces its embedding."""
FRAME_SEP_TOKEN = "<frame_sep>"
"""Optional token after each frame's visual tokens."""
DEFAULT_SPECIAL_TOKENS = (IMAGE_TOKEN, FRAME_SEP_TOKEN, "<|im_start|>", "<|im_end|>")
VILA_TOKENS = ("<vila/sentinel>", "<image>", "<vila/video>")
"""VILA's three special tokens, appended after the stored vocabulary in this order by VILA's loader."""
ROLES = ("bos", "eos", "pad")
"""The ids every tokenizer states (`bos_id`, `eos_id`, `pad_id`), under these names in a record's facts + "_id"."""
HF_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
"""Files beside a tokenizer.json that name its special tokens as text (`eos_token`, ...)."""


class _SpecialTokenMixin:
    """Splits text at special tokens and maps them to ids; subclasses supply `_encode_plain` and `token_text`."""

    names_its_special_tokens = False
    """True where the tokenizer's files list every special token its model was trained with (a tokenizer.json's added
    tokens), so a chat marker it lacks is one the model never saw; False where the project appends the chat markers
    and training learns them (sentencepiece models, bytes)."""

    def _init_special(self, special_tokens: Iterable[str], base_vocab: int, lookup) -> None:
        self.special_tokens: dict[str, int] = {}
        appended = []
        next_id = base_vocab
        for tok in special_tokens:
            existing = lookup(tok)
            if existing is None:
                existing, next_id = next_id, next_id + 1
                appended.append(tok)
            self.special_tokens[tok] = existing
        self.appended_tokens = frozenset(appended)  # the special tokens the vocabulary lacks, given ids after it
        self._vocab_size = next_id
        self._id_to_special = {v: k for k, v in self.special_tokens.items()}
        pattern = "|".join(re.escape(t) for t in sorted(self.special_tokens, key=len, reverse=True))
        self._special_re = re.compile(f"({pattern})") if pattern else None

    @property
    def vocab_size(self) -> int:
        """Ids in use, special tokens included: size the embedding table from this."""
        return self._vocab_size

    def _init_roles(self, declared: Mapping[str, tuple[int, str]], facts: Mapping | None, where: str) -> None:
        """Set bos_id, eos_id and pad_id from what the tokenizer's files declare ({role: (id, file)}) and the
        checkpoint record's facts ({"eos_id": ...}); `role_sources` says where each came from. BOS and EOS must
        agree where both give one (they decide what a template learns and where generation stops); for pad the files
        win, the record filling in where they are silent: the filler id changes no result, and runs before this
        rule recorded the EOS as pad."""
        facts = facts or {}
        ids: dict[str, int | None] = {}
        self.role_sources: dict[str, str] = {}
        for role in ROLES:
            mine, recorded = declared.get(role), facts.get(f"{role}_id")
            if recorded is not None and not 0 <= int(recorded) < self.vocab_size:
                raise TokenizerError(f"the checkpoint record's {role}_id {recorded} is outside the {self.vocab_size} "
                                     f"ids of the tokenizer {where}: give the checkpoint's tokenizer")
            if role != "pad" and mine is not None and recorded is not None and mine[0] != int(recorded):
                raise TokenizerError(
                    f"the tokenizer {where} has {role.upper()} id {mine[0]} ({self.token_text(mine[0])!r}, from "
                    f"{mine[1]}), the checkpoint's record {recorded} ({self.token_text(int(recorded))!r}): give the "
                    f"tokenizer the checkpoint was trained with, or correct {mine[1]}")
            if mine is not None:
                ids[role], self.role_sources[role] = mine[0], mine[1]
            elif recorded is not None:
                ids[role], self.role_sources[role] = int(recorded), "the checkpoint's record"
            else:
                ids[role] = None
        if ids["pad"] is None:
            # Fillers are documents of their own with no loss: any real id serves, the EOS where there is one.
            ids["pad"], self.role_sources["pad"] = (ids["eos"], "the EOS (no pad token named)") \
                if ids["eos"] is not None else (0, "id 0 (no pad or EOS token named)")
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]

    def token_text(self, i: int) -> str | None:
        """The text of id `i` (a special token's text for appended ids), None for an unknown id."""
        raise NotImplementedError

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

    def __init__(self, model_file: str | os.PathLike, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, *,
                 facts: Mapping | None = None):
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
        declared = {role: (i, os.path.basename(model_file))
                    for role, i in (("bos", self.sp.bos_id()), ("eos", self.sp.eos_id()), ("pad", self.sp.pad_id()))
                    if i >= 0}
        self._init_roles(declared, facts, model_file)

    def token_text(self, i: int) -> str | None:
        if 0 <= i < self.sp.get_piece_size():
            return self.sp.id_to_piece(i)
        return self._id_to_special.get(i)

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
    """A Hugging Face `tokenizer.json` (Qwen2's or Llama-3's byte-level BPE); needs `pip install tokenizers`.

    BOS, EOS and pad come from the files beside it (`hf_declared_ids`), else from `facts` (a checkpoint record's
    tokenizer facts); see the module docstring.
    """

    names_its_special_tokens = True

    def __init__(self, tokenizer_json: str | os.PathLike, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
                 *, facts: Mapping | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("HFTokenizerFile needs the 'tokenizers' package: pip install tokenizers") from None
        tokenizer_json = os.fspath(tokenizer_json)
        self.tok = Tokenizer.from_file(tokenizer_json)
        self._base_vocab = self.tok.get_vocab_size(with_added_tokens=True)
        self._init_special(special_tokens, self._base_vocab, self.tok.token_to_id)
        declared = hf_declared_ids(os.path.dirname(os.path.abspath(tokenizer_json)), self.tok.token_to_id,
                                   self._base_vocab)
        self._init_roles(declared, facts, tokenizer_json)

    def token_text(self, i: int) -> str | None:
        if 0 <= i < self._base_vocab:
            return self.tok.id_to_token(i)
        return self._id_to_special.get(i)

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

    def __init__(self, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, *, facts: Mapping | None = None):
        self._init_special(special_tokens, 258, lambda tok: None)
        layout = "the byte tokenizer's layout"
        self._init_roles({"bos": (256, layout), "eos": (257, layout), "pad": (257, layout)}, facts, "of bytes")

    def token_text(self, i: int) -> str | None:
        if 0 <= i < 256:
            return repr(bytes([i]))
        return {256: "BOS", 257: "EOS"}.get(i, self._id_to_special.get(i))

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


def _token_content(value, name: str, where: str) -> str | None:
    # tokenizer_config.json writes a special token as its text or as an AddedToken object {"content": ...}.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where}: {name} must be a token's text or an object with 'content', got {value!r}")


def hf_declared_ids(folder: str | os.PathLike, token_to_id, vocab_size: int) -> dict[str, tuple[int, str]]:
    """{role: (id, file)} for the BOS, EOS and pad tokens that the files in `folder` name (roles they do not name are
    absent): `<role>_token` of tokenizer_config.json and special_tokens_map.json (as text, looked up with
    `token_to_id`; the two must agree), else `<role>_token_id` of generation_config.json (one id).

    Raises:
        TokenizerError: a file names a token the vocabulary lacks, the two files disagree, generation_config.json
            lists several EOS ids where no other file names one, or a file is not valid JSON.
    """
    folder = os.fspath(folder)

    def read(name):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{path} cannot be read as JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise TokenizerError(f"{path} holds {type(cfg).__name__}, expected a JSON object")
        return cfg

    out: dict[str, tuple[int, str]] = {}
    texts: dict[str, tuple[str, str]] = {}
    for name in HF_TOKEN_FILES:
        cfg = read(name)
        for role in ROLES if cfg is not None else ():
            text = _token_content(cfg.get(f"{role}_token"), f"{role}_token", os.path.join(folder, name))
            if text is None:
                continue
            if role in texts and texts[role][0] != text:
                raise TokenizerError(f"{folder}: {texts[role][1]} names {role}_token {texts[role][0]!r}, {name} "
                                     f"{text!r}: make them agree")
            i = token_to_id(text)
            if i is None:
                raise TokenizerError(f"{os.path.join(folder, name)} names {role}_token {text!r}, which the "
                                     f"tokenizer.json beside it lacks: correct {name} or give the model's tokenizer")
            texts.setdefault(role, (text, name))
            out.setdefault(role, (int(i), name))
    gen = read("generation_config.json")
    for role in ROLES if gen is not None else ():
        i = gen.get(f"{role}_token_id")
        if role in out or i is None:
            continue
        if isinstance(i, list):
            if len(i) != 1:
                raise TokenizerError(f"{os.path.join(folder, 'generation_config.json')} lists {role}_token_id {i} "
                                     f"and no tokenizer file names {role}_token: add the one the chat template ends "
                                     f"replies with as {role}_token to tokenizer_config.json")
            i = i[0]
        if not isinstance(i, int) or not 0 <= i < vocab_size:
            raise TokenizerError(f"{os.path.join(folder, 'generation_config.json')}: {role}_token_id {i!r} is not an "
                                 f"id of the tokenizer's {vocab_size}")
        out[role] = (i, "generation_config.json")
    return out


def load_tokenizer(path: str | os.PathLike | None, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, *,
                   facts: Mapping | None = None):
    """A sentencepiece `.model` file, a `tokenizer.json`, a folder holding one of them, or None (bytes).

    facts: a checkpoint record's tokenizer facts (`eos_id`, `bos_id`, `pad_id`): used where the tokenizer's files
    name no such token, checked against them where they do.
    """
    if path is None:
        return ByteTokenizer(special_tokens, facts=facts)
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name), special_tokens, facts=facts)
        if os.path.isfile(os.path.join(path, "vocab.json")) and os.path.isfile(os.path.join(path, "merges.txt")):
            # VILA's Qwen2 releases ship the slow tokenizer's files only; rebuilding the fast one by hand would risk
            # ids that differ from transformers'.
            raise FileNotFoundError(
                f"{path} holds vocab.json and merges.txt but no tokenizer.json: write one with transformers, e.g. "
                f"python -c \"from transformers import AutoTokenizer as T; T.from_pretrained('{path}')"
                f".save_pretrained('{path}')\", then pass the folder again")
        raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {path}")
    if path.endswith(".json"):
        return HFTokenizerFile(path, special_tokens, facts=facts)
    return SentencePieceTokenizer(path, special_tokens, facts=facts)


def special_tokens_for(record=None) -> tuple:
    """The special tokens a tokenizer must carry for a checkpoint (its models.record.ModelRecord, or None), in the
    order that gives them the checkpoint's ids: VILA's three (`<vila/sentinel>`, `<image>`, `<vila/video>`,
    appended after the stored vocabulary in that order) for a converted VILA checkpoint, else the project's."""
    facts = getattr(record, "tokenizer", None) or {}
    if facts.get("sentinel_token_id") is not None:
        return tuple(VILA_TOKENS) + tuple(t for t in DEFAULT_SPECIAL_TOKENS if t not in VILA_TOKENS)
    return DEFAULT_SPECIAL_TOKENS


def load_tokenizer_for(path: str | os.PathLike | None, record=None):
    """`load_tokenizer(path)` with the special tokens and the BOS/EOS/pad facts of the checkpoint (its record, or
    None) the run starts from."""
    return load_tokenizer(path, special_tokens_for(record), facts=getattr(record, "tokenizer", None))


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
