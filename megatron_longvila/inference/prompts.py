"""Prompts for generation in the training chat template: a question about a video or an image.

    video_prompt(tokenizer, question, path, *, template, tokens_per_frame, image_size, num_frames=None, fps=None,
                 frame_separator=False, decode_backend="auto", image_mode="pad", ...) -> LongVILASample
    image_prompt(tokenizer, question, path, *, template, tokens_per_frame, image_size) -> LongVILASample
    stop_ids(tokenizer, template) -> set of ids that end an answer

The prompt is laid out exactly as training lays out a conversation (data.conversation.tokenize_conversation), cut
where the assistant's answer would begin. Frames are not decoded here: each frame's pixels come from a loader that
decodes (and preprocesses, SigLIP's way) only the frames asked for, so in a distributed call every rank decodes
only the frames stage 1 gives it.
"""

from __future__ import annotations

from typing import Optional, Set

import torch

from ..batch.sample import LongVILASample, Media
from ..data.conversation import MediaFrames, get_template, tokenize_conversation
from ..data.dataset import load_image
from ..data.frames import select_frame_indices
from ..data.image_processor import SiglipImageProcessor
from ..data.video import decode_frames, probe_video

__all__ = ["video_prompt", "image_prompt", "text_prompt", "stop_ids"]


def _prompt(tokenizer, template, question, media_frames, tokens_per_frame, frame_separator):
    conv = [{"from": "human", "value": question}, {"from": "gpt", "value": "x"}]
    s = tokenize_conversation(conv, media_frames, tokenizer, template, tokens_per_frame=tokens_per_frame,
                              frame_separator=frame_separator)
    first = int((s.labels != -100).nonzero().flatten()[0])  # where the assistant's answer starts
    return s.input_ids[:first], s.media


def video_prompt(tokenizer, question: str, path: str, *, template: str, tokens_per_frame: int, image_size: int,
                 num_frames: Optional[int] = 8, fps: Optional[float] = None, frame_separator=False,
                 decode_backend: str = "auto", image_mode: str = "pad", image_mean=(0.5, 0.5, 0.5),
                 image_std=(0.5, 0.5, 0.5)) -> LongVILASample:
    """A question about the video at `path`, its frames sampled by count (or fps) as in training."""

    info = probe_video(path)
    indices = select_frame_indices(info.num_frames, info.fps, num_frames=None if fps else num_frames, fps=fps)
    ids, items = _prompt(tokenizer, template, "<video>\n" + question, [MediaFrames("video", path, indices, info.fps)],
                         tokens_per_frame, frame_separator)
    item = items[0]
    proc = SiglipImageProcessor(image_size, mode=image_mode, mean=image_mean, std=image_std)

    def load(frames):
        return proc(decode_frames(path, [indices[k] for k in frames], backend=decode_backend))

    pos = torch.stack([torch.tensor(list(item.token_positions(k))) for k in range(item.num_frames)])
    return LongVILASample(input_ids=ids, labels=torch.full_like(ids, -100),
                          media=[Media(token_positions=pos, frame_size=(image_size, image_size), kind="video",
                                       loader=load)])


def image_prompt(tokenizer, question: str, path: str, *, template: str, tokens_per_frame: int, image_size: int,
                 image_mode: str = "pad", image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)) -> LongVILASample:
    """A question about the image at `path`."""

    ids, items = _prompt(tokenizer, template, "<image>\n" + question, [MediaFrames("image", path, [0])],
                         tokens_per_frame, False)
    proc = SiglipImageProcessor(image_size, mode=image_mode, mean=image_mean, std=image_std)
    pos = torch.tensor([list(items[0].token_positions(0))])
    return LongVILASample(input_ids=ids, labels=torch.full_like(ids, -100),
                          media=[Media(token_positions=pos, frame_size=(image_size, image_size), kind="image",
                                       loader=lambda frames: proc(load_image(path)[None]))])


def text_prompt(tokenizer, question: str, *, template: str) -> LongVILASample:
    ids, _ = _prompt(tokenizer, template, question, [], 1, False)
    return LongVILASample(input_ids=ids, labels=torch.full_like(ids, -100))


def stop_ids(tokenizer, template: str) -> Set[int]:
    """Ids that end an answer: the tokenizer's EOS and the template's end-of-turn marker when it is one token (the
    plain template's is its newline)."""
    out = set()
    if getattr(tokenizer, "eos_id", None) is not None:
        out.add(int(tokenizer.eos_id))
    suffix = get_template(template).assistant_suffix
    suffix = suffix.strip() or suffix  # "<|im_end|>" whole; "\n" (plain) as it is
    if suffix:
        ids = tokenizer.encode(suffix)
        if len(ids) == 1:
            out.add(int(ids[0]))
    return out
