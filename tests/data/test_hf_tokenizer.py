"""HFTokenizerFile on a real tokenizer.json: a tiny Qwen2-style byte-level BPE trained here with `tokenizers`, with
Qwen2 Instruct's tokenizer_config.json beside it."""

import json

import pytest
import torch

pytest.importorskip("tokenizers", reason="the tokenizers package is not installed (pip install tokenizers)")

from megatron_longvila.data.conversation import MediaFrames, tokenize_conversation  # noqa: E402
from megatron_longvila.errors import DataError
from megatron_longvila.data.sample import IGNORE_INDEX  # noqa: E402
from megatron_longvila.data.tokenizer import HFTokenizerFile, load_tokenizer  # noqa: E402

# Qwen2 ships these as added special tokens; <image> and <frame_sep> are not in its vocabulary.
VOCAB_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=VOCAB_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(200)]
    lines += ["What is happening in the video? A person walks a dog in the park.", "Describe the image."] * 50
    tok.train_from_iterator(lines, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    (path.parent / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(tok.token_to_id(t)): {"content": t, "special": True} for t in VOCAB_SPECIALS},
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return path


@pytest.fixture(scope="module")
def hf(tokenizer_json):
    return HFTokenizerFile(tokenizer_json)


def _conv(*turns):
    return [{"from": r, "value": v} for r, v in turns]


def test_loading_and_special_tokens(hf, tokenizer_json):
    base = hf.tok.get_vocab_size(with_added_tokens=True)
    # Tokens the vocabulary has are reused; the others are appended after it, and vocab_size counts them.
    assert hf.token_id("<|im_start|>") == hf.tok.token_to_id("<|im_start|>") < base
    assert hf.eos_id == hf.token_id("<|im_end|>") and hf.bos_id is None
    assert hf.pad_id == hf.tok.token_to_id("<|endoftext|>")  # from tokenizer_config.json, not the EOS
    assert {hf.image_token_id, hf.frame_sep_token_id} == {base, base + 1} and hf.vocab_size == base + 2
    for path in (tokenizer_json, tokenizer_json.parent):  # the file, or a folder holding it
        t = load_tokenizer(path)
        assert isinstance(t, HFTokenizerFile) and t.special_tokens == hf.special_tokens


def test_round_trip_never_splits_special_tokens(hf):
    text = "<|im_start|>user\n<image><frame_sep>\nWhat is ü 漢 happening?<|im_end|>"
    ids = hf.encode(text)
    assert hf.decode(ids) == text
    assert ids[0] == hf.token_id("<|im_start|>") and ids[-1] == hf.eos_id
    assert ids.count(hf.image_token_id) == 1 and ids.count(hf.frame_sep_token_id) == 1
    # Byte-level BPE alone would cut "<image>" into pieces: the mixin cuts the text at it first.
    assert len(hf.tok.encode("<image>", add_special_tokens=False).ids) > 1
    with pytest.raises(DataError) as e:
        hf.encode("bad \ud800 surrogate")
    assert e.value.reason == "undecodable_text"


def test_chatml_labels_only_on_assistant_turns(hf):
    conv = _conv(("human", "Describe the image."), ("gpt", "A dog."), ("human", "More?"), ("gpt", "A lazy dog."))
    s = tokenize_conversation(conv, [], hf, "chatml")
    learned = s.labels != IGNORE_INDEX
    assert torch.equal(s.labels[learned], s.input_ids[learned])
    assert hf.decode(s.labels[learned].tolist()) == "A dog.<|im_end|>A lazy dog.<|im_end|>"
    full = hf.decode(s.input_ids.tolist())
    assert full.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nDescribe")
    assert full.endswith("<|im_start|>assistant\nA lazy dog.<|im_end|>\n")


def test_video_placeholder_expands_per_frame(hf):
    conv = _conv(("human", "<video>\nWhat is happening?"), ("gpt", "A person walks a dog."))
    media = [MediaFrames("video", "/v.mp4", [0, 10, 20], 24.0)]
    s = tokenize_conversation(conv, media, hf, "chatml", tokens_per_frame=4, frame_separator=True)
    img, sep = hf.image_token_id, hf.frame_sep_token_id
    assert (s.input_ids == img).sum() == 12 and (s.input_ids == sep).sum() == 3
    (item,) = s.media
    for j in range(3):
        pos = list(item.token_positions(j))
        assert (s.input_ids[pos] == img).all() and s.input_ids[pos[-1] + 1] == sep
    assert (s.labels[s.input_ids == img] == IGNORE_INDEX).all()
    assert hf.decode(s.labels[s.labels != IGNORE_INDEX].tolist()) == "A person walks a dog.<|im_end|>"
