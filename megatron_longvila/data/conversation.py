"""Chat templates: conversation turns + media -> input_ids, labels and the positions of visual tokens.

Each `<image>` or `<video>` placeholder in a user turn takes the next media item of the sample (text
order of placeholders, manifest order of media) and expands, per frame, into `tokens_per_frame` image-token ids, followed by one
frame-separator id when `frame_separator` is set. The model later replaces the embeddings at those
positions with the projector's output for that frame. Media without a placeholder get one prepended to
the first user turn (VILA does the same). Text segments (template parts, turns) are tokenized separately, without a
sentencepiece dummy prefix at each segment's start. Labels are IGNORE_INDEX everywhere except the assistant
replies and the end-of-turn marker after them, so the model learns to stop.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import torch

from megatron_longvila.errors import DataError, TokenizerError
from megatron_longvila.data.sample import IGNORE_INDEX, MediaItem, Sample
from megatron_longvila.data.tokenizer import FRAME_SEP_TOKEN, IMAGE_TOKEN

PLACEHOLDER_RE = re.compile(r"(<image>|<video>)")
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class ChatTemplate:
    """How turns are laid out as text. `{}` in a format string is the turn's text."""

    name: str
    """Registry name."""
    system: str | None = None
    """Default system prompt (a "system" turn in the sample overrides it); None: no system block."""
    system_format: str = "{}"
    """Layout of the system block."""
    user_format: str = "{}"
    """Layout of a user turn (placeholders inside are expanded to visual tokens)."""
    assistant_prefix: str = ""
    """Text before an assistant reply; not learned."""
    assistant_suffix: str = ""
    """Text after the reply; learned (it is how the model learns to end a turn)."""
    assistant_eos: bool = False
    """Append the tokenizer's EOS id after each reply (learned)."""
    turn_separator: str = ""
    """Text after each complete assistant turn; not learned."""
    add_bos: bool = False
    """Start the sequence with the tokenizer's BOS id."""
    markers: tuple[str, ...] = ()
    """Tokens of the layout that must each be one id the tokenizer has (`check_template`)."""
    end_token: str | None = None
    """The marker that ends each reply (learned, and where generation stops): the template's EOS, whatever the
    tokenizer's own EOS is."""


TEMPLATES: dict[str, ChatTemplate] = {
    # Qwen2-style ChatML, the template of LongVILA's Qwen2-based models.
    "chatml": ChatTemplate(
        name="chatml",
        system="You are a helpful assistant.",
        system_format="<|im_start|>system\n{}<|im_end|>\n",
        user_format="<|im_start|>user\n{}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        assistant_suffix="<|im_end|>",
        turn_separator="\n",
        markers=("<|im_start|>", "<|im_end|>"),
        end_token="<|im_end|>",
    ),
    # Llama-3 Instruct (Llama-3-based LongVILA models), VILA's llama_3 system prompt; BOS is <|begin_of_text|>.
    "llama3": ChatTemplate(
        name="llama3",
        system="You are a helpful language and vision assistant. You are able to understand the visual content that "
        "the user provides, and assist the user with a variety of tasks using natural language.",
        system_format="<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>",
        user_format="<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_suffix="<|eot_id|>",
        add_bos=True,
        markers=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        end_token="<|eot_id|>",
    ),
    # Vicuna v1 (Llama-2-based VILA models): "SYSTEM USER: ... ASSISTANT: ...</s>".
    "vicuna": ChatTemplate(
        name="vicuna",
        system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        system_format="{} ",
        user_format="USER: {} ",
        assistant_prefix="ASSISTANT: ",
        assistant_eos=True,
        add_bos=True,
    ),
    # Alignment / captioning stage: media then caption, no roles; the caption and a newline are learned.
    "plain": ChatTemplate(name="plain", assistant_suffix="\n"),
}


def get_template(name_or_template: str | ChatTemplate) -> ChatTemplate:
    if isinstance(name_or_template, ChatTemplate):
        return name_or_template
    if name_or_template not in TEMPLATES:
        raise ValueError(f"unknown chat template {name_or_template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name_or_template]


def _template_problem(tokenizer, tpl: ChatTemplate) -> str | None:
    """Why `tokenizer` cannot serve `tpl`, or None."""
    ends = (tpl.end_token,) if tpl.end_token else ()
    for marker in ends + tuple(m for m in tpl.markers if m not in ends):  # the EOS first: it matters most
        ids = tokenizer.encode(marker)
        # A tokenizer.json lists every special token its model knows: a marker past them is one it never saw.
        foreign = getattr(tokenizer, "names_its_special_tokens", False) and \
            marker in getattr(tokenizer, "appended_tokens", ())
        if len(ids) != 1 or foreign:
            what = "ends each reply with" if marker == tpl.end_token else "uses"
            return f"chat template {tpl.name!r} {what} {marker!r}, which the tokenizer lacks"
    if tpl.add_bos and tokenizer.bos_id is None:
        return f"chat template {tpl.name!r} starts with a BOS, and the tokenizer names none"
    if tpl.assistant_eos and tokenizer.eos_id is None:
        return f"chat template {tpl.name!r} ends each reply with the tokenizer's EOS, and the tokenizer names none"
    return None


def check_template(tokenizer, template: str | ChatTemplate) -> ChatTemplate:
    """The template, after checking that the tokenizer can serve it: its BOS and EOS where the template needs them,
    each marker one id of the tokenizer (for a tokenizer.json, one of its own tokens: a marker the project would
    append is one the model never saw, and a reply ended by it would never stop).

    Raises:
        TokenizerError: naming the templates this tokenizer can serve.
    """
    tpl = get_template(template)
    problem = _template_problem(tokenizer, tpl)
    if problem is None:
        return tpl
    eos = tokenizer.eos_id
    fits = [name for name, t in TEMPLATES.items() if _template_problem(tokenizer, t) is None]
    eos_text = "none" if eos is None else repr(tokenizer.token_text(eos))
    raise TokenizerError(f"{problem} (its EOS: {eos_text}): use a template it can serve ({', '.join(fits)}), or the "
                         f"tokenizer of the model the template belongs to")


@dataclasses.dataclass(slots=True)
class MediaFrames:
    """What the template needs to know about one media item before tokenizing: its frames."""

    kind: str
    """"image" or "video"."""
    path: str
    """The media file."""
    frame_indices: list[int]
    """Selected frames ([0] for an image)."""
    fps: float | None = None
    """The video's frame rate."""


def tokenize_conversation(
    conversations: Sequence[dict],
    media: Sequence[MediaFrames],
    tokenizer,
    template: str | ChatTemplate = "chatml",
    *,
    tokens_per_frame: int = 1,
    frame_separator: bool | str = False,
    max_seq_len: int | None = None,
    loss_weight: float = 1.0,
    sample_id: str = "",
    index: int = -1,
) -> Sample:
    """Lay out a conversation with the template and tokenize it.

    Args:
        conversations: turns [{"from": "human"|"user"|"gpt"|"assistant"|"system", "value": str}, ...].
        media: the sample's media with their selected frames, in placeholder order.
        tokenizer: a tokenizer from `megatron_longvila.data.tokenizer`.
        template: a ChatTemplate or the name of one in TEMPLATES (`check_template` must accept the pair).
        tokens_per_frame: visual tokens per frame after the projector (e.g. 196 for SigLIP-384 with
            2x2 downsampling of its 27x27 patches, rounded as the projector does).
        frame_separator: after each frame's visual tokens, True puts one frame-separator id (`<frame_sep>`); a
            string puts that text's tokens (VILA puts "\n", one token, after every frame).
        max_seq_len: longer results raise DataError("too_long").

    Raises:
        DataError: no_assistant_turn, bad_conversation, undecodable_text or too_long.
        TokenizerError: the tokenizer cannot serve the template.
    """
    if tokens_per_frame < 1:
        raise ValueError(f"tokens_per_frame must be >= 1, got {tokens_per_frame}")
    tpl = check_template(tokenizer, template)
    turns = _check_turns(conversations)
    image_id = tokenizer.token_id(IMAGE_TOKEN)
    if isinstance(frame_separator, str):
        sep_ids = tokenizer.encode(frame_separator)
        if not sep_ids:
            raise ValueError(f"frame separator {frame_separator!r} encodes to no token")
    else:
        sep_ids = [tokenizer.token_id(FRAME_SEP_TOKEN)] if frame_separator else []
    sep_id = tokenizer.token_id(FRAME_SEP_TOKEN) if frame_separator is True else None

    # Media without a placeholder go in front of the first user turn, one per line.
    placeholders = sum(len(PLACEHOLDER_RE.findall(text)) for role, text in turns if role == "user")
    if placeholders > len(media):
        raise DataError("bad_conversation", f"{placeholders} media placeholders but {len(media)} media items")
    if placeholders < len(media):
        missing = "".join("<video>\n" if m.kind == "video" else "<image>\n" for m in media[placeholders:])
        first_user = next((k for k, (role, _) in enumerate(turns) if role == "user"), None)
        if first_user is None:
            turns.insert(0, ("user", missing.rstrip("\n")))
        else:
            turns[first_user] = ("user", missing + turns[first_user][1])

    ids: list[int] = []
    labels: list[int] = []
    items: list[MediaItem] = []

    def add_text(text: str, learn: bool) -> None:
        if not text:
            return
        piece = tokenizer.encode(text)
        if image_id in piece or (sep_id is not None and sep_id in piece):
            raise DataError("bad_conversation", "a media token appears in text outside a placeholder")
        ids.extend(piece)
        labels.extend(piece if learn else [IGNORE_INDEX] * len(piece))

    def add_id(token: int, learn: bool) -> None:  # check_template made sure the ids exist
        ids.append(token)
        labels.append(token if learn else IGNORE_INDEX)

    def add_user(text: str) -> None:
        # Expand placeholders inside the user format: split the formatted turn at them.
        for part in PLACEHOLDER_RE.split(tpl.user_format.format(text)):
            if PLACEHOLDER_RE.fullmatch(part):
                m = media[len(items)]
                offsets = []
                for _ in m.frame_indices:
                    offsets.append(len(ids))
                    ids.extend([image_id] * tokens_per_frame)
                    ids.extend(sep_ids)
                labels.extend([IGNORE_INDEX] * (len(ids) - len(labels)))
                items.append(MediaItem(m.kind, m.path, list(m.frame_indices), offsets, tokens_per_frame, m.fps))
            else:
                add_text(part, learn=False)

    if tpl.add_bos:
        add_id(tokenizer.bos_id, learn=False)
    system = next((text for role, text in turns if role == "system"), tpl.system)
    if system is not None:
        add_text(tpl.system_format.format(system), learn=False)
    for role, text in turns:
        if role == "user":
            add_user(text)
        elif role == "assistant":
            add_text(tpl.assistant_prefix, learn=False)
            add_text(text + tpl.assistant_suffix, learn=True)
            if tpl.assistant_eos:
                add_id(tokenizer.eos_id, learn=True)
            add_text(tpl.turn_separator, learn=False)

    if max_seq_len is not None and len(ids) > max_seq_len:
        raise DataError("too_long", f"{len(ids)} tokens > max_seq_len {max_seq_len}")
    return Sample(
        input_ids=torch.tensor(ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        media=items,
        loss_weight=float(loss_weight),
        sample_id=sample_id,
        index=index,
    )


def _check_turns(conversations: Sequence[dict]) -> list[tuple[str, str]]:
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise DataError("bad_conversation", "conversations must be a non-empty list of turns")
    turns: list[tuple[str, str]] = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "value" not in turn:
            raise DataError("bad_conversation", f"turn {k} is not an object with 'from' and 'value'")
        role, value = str(turn.get("from", "")).lower(), turn["value"]
        if not isinstance(value, str):
            raise DataError("bad_conversation", f"turn {k}: 'value' must be text, got {type(value).__name__}")
        if role in USER_ROLES:
            turns.append(("user", value))
        elif role in ASSISTANT_ROLES:
            if PLACEHOLDER_RE.search(value):
                raise DataError("bad_conversation", f"turn {k}: media placeholder in an assistant turn")
            turns.append(("assistant", value))
        elif role == "system":
            turns.append(("system", value))
        else:
            raise DataError("bad_conversation", f"turn {k}: unknown role {turn.get('from')!r}")
    if not any(role == "assistant" and text.strip() for role, text in turns):
        raise DataError("no_assistant_turn", "the conversation has no non-empty assistant turn to learn from")
    return turns
