import pytest
import torch

from megatron_longvila.data.conversation import MediaFrames, tokenize_conversation
from megatron_longvila.errors import DataError
from megatron_longvila.data.sample import IGNORE_INDEX


def _conv(*turns):
    return [{"from": r, "value": v} for r, v in turns]


def test_tokenizer_round_trip_and_special_tokens(tokenizer):
    text = "<|im_start|>user\n<image>\nWhat is ü 漢 happening?<|im_end|>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids.count(tokenizer.image_token_id) == 1
    assert tokenizer.image_token_id >= 320 - 1 and tokenizer.vocab_size > max(ids)
    with pytest.raises(DataError) as e:
        tokenizer.encode("bad \ud800 surrogate")
    assert e.value.reason == "undecodable_text"


def test_chatml_labels_only_on_assistant_turns(tokenizer):
    conv = _conv(("human", "Describe the image."), ("gpt", "A dog."), ("human", "More?"), ("gpt", "A lazy dog."))
    s = tokenize_conversation(conv, [], tokenizer, "chatml")
    assert s.input_ids.dtype == torch.long and s.labels.shape == s.input_ids.shape
    learned = s.labels != IGNORE_INDEX
    assert torch.equal(s.labels[learned], s.input_ids[learned])  # labels not shifted
    # The learned text is exactly the two replies, each with its end marker.
    assert tokenizer.decode(s.labels[learned].tolist()) == "A dog.<|im_end|>A lazy dog.<|im_end|>"
    full = tokenizer.decode(s.input_ids.tolist())
    assert full.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nDescribe")
    assert full.endswith("<|im_start|>assistant\nA lazy dog.<|im_end|>\n")


def test_video_placeholder_expands_per_frame(tokenizer):
    conv = _conv(("human", "<video>\nWhat happens?"), ("gpt", "A dog runs."))
    media = [MediaFrames("video", "/v.mp4", [0, 10, 20], 24.0)]
    s = tokenize_conversation(conv, media, tokenizer, "chatml", tokens_per_frame=4, frame_separator=True)
    img, sep = tokenizer.image_token_id, tokenizer.frame_sep_token_id
    assert (s.input_ids == img).sum() == 12 and (s.input_ids == sep).sum() == 3
    (item,) = s.media
    assert item.kind == "video" and item.frame_indices == [0, 10, 20] and item.tokens_per_frame == 4
    for j in range(3):
        pos = list(item.token_positions(j))
        assert (s.input_ids[pos] == img).all()
        assert s.input_ids[pos[-1] + 1] == sep
    assert (s.labels[s.input_ids == img] == IGNORE_INDEX).all()


def test_missing_placeholders_are_prepended_and_images_in_order(tokenizer):
    conv = _conv(("human", "Compare <image> with"), ("gpt", "They differ."))
    media = [MediaFrames("image", "/a.png", [0]), MediaFrames("image", "/b.png", [0])]
    s = tokenize_conversation(conv, media, tokenizer, "vicuna", tokens_per_frame=2)
    assert [m.path for m in s.media] == ["/a.png", "/b.png"]
    # The missing placeholder goes in front of the first user turn; placeholders take media in text order.
    assert s.media[0].frame_offsets[0] < s.media[1].frame_offsets[0]
    text = tokenizer.decode(s.input_ids.tolist())
    assert "USER: <image><image>\nCompare <image><image> with ASSISTANT: They differ." in text
    assert s.input_ids[0] == tokenizer.bos_id and s.labels[-1] == tokenizer.eos_id


def test_plain_template_learns_caption(tokenizer):
    s = tokenize_conversation(_conv(("human", "<image>"), ("gpt", "a red square")),
                              [MediaFrames("image", "/a.png", [0])], tokenizer, "plain", tokens_per_frame=3)
    assert s.input_ids[:3].tolist() == [tokenizer.image_token_id] * 3
    assert tokenizer.decode(s.labels[s.labels != IGNORE_INDEX].tolist()) == "a red square\n"


@pytest.mark.parametrize(
    "conv,media,reason",
    [
        (_conv(("human", "hi")), [], "no_assistant_turn"),
        (_conv(("human", "hi"), ("gpt", "  ")), [], "no_assistant_turn"),
        (_conv(("human", "<image> <image>"), ("gpt", "x")), [MediaFrames("image", "/a.png", [0])], "bad_conversation"),
        (_conv(("human", "hi"), ("gpt", "see <image>")), [], "bad_conversation"),
        (_conv(("robot", "hi"), ("gpt", "x")), [], "bad_conversation"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], [], "bad_conversation"),
        (_conv(("human", "hi \udc80"), ("gpt", "x")), [], "undecodable_text"),
    ],
)
def test_bad_conversations(tokenizer, conv, media, reason):
    with pytest.raises(DataError) as e:
        tokenize_conversation(conv, media, tokenizer, "chatml")
    assert e.value.reason == reason


def test_too_long(tokenizer):
    conv = _conv(("human", "<video>"), ("gpt", "x"))
    with pytest.raises(DataError) as e:
        tokenize_conversation(conv, [MediaFrames("video", "/v", list(range(10)))], tokenizer, tokens_per_frame=10,
                              max_seq_len=99)
    assert e.value.reason == "too_long"
