"""A converted VILA checkpoint's media facts reach training and generation: the frame separator ("\\n" after each
frame), the number of frames, the image preprocessing, and VILA's special tokens at VILA's ids."""

import torch

from megatron_longvila.data.conversation import MediaFrames, tokenize_conversation
from megatron_longvila.data.tokenizer import ByteTokenizer
from megatron_longvila.data.tokenizer import special_tokens_for
from megatron_longvila.models.record import ModelRecord, media_settings, training_media


def _vila_record():
    rec = ModelRecord()
    rec.tokenizer = {"vocab_size": 261, "sentinel_token_id": 258, "media_token_id": 259, "video_token_id": 260}
    rec.media = {"frame_separator": "\n", "num_video_frames": 6, "image_aspect_ratio": "resize",
                 "image_mean": [0.48, 0.45, 0.41], "image_std": [0.27, 0.26, 0.28]}
    return rec


def test_vila_special_tokens_get_vilas_ids():
    rec = _vila_record()
    tok = ByteTokenizer(special_tokens_for(rec))  # 256 bytes + BOS/EOS, then VILA's three in VILA's order
    assert tok.token_id("<vila/sentinel>") == 258 and tok.image_token_id == rec.tokenizer["media_token_id"]
    assert tok.token_id("<vila/video>") == 260


def test_media_settings_and_newline_after_each_frame():
    rec = _vila_record()
    class A:  # no --num-frames given
        num_frames = None
    m = media_settings(rec, A())
    assert m == {"frame_separator": "\n", "num_frames": 6, "image_mode": "resize", "frame_sampling": "uniform",
                 "image_mean": (0.48, 0.45, 0.41), "image_std": (0.27, 0.26, 0.28)}
    tok = ByteTokenizer(special_tokens_for(rec))
    conv = [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "Yes."}]
    s = tokenize_conversation(conv, [MediaFrames("video", "v.mp4", [0, 1, 2])], tok, "chatml", tokens_per_frame=2,
                              frame_separator=m["frame_separator"])
    nl = tok.encode("\n")
    for off in s.media[0].frame_offsets:  # each frame's 2 visual tokens, then "\n"
        assert s.input_ids[off:off + 2].tolist() == [tok.image_token_id] * 2
        assert s.input_ids[off + 2:off + 2 + len(nl)].tolist() == nl
    assert torch.all(s.labels[:s.media[0].frame_offsets[-1] + 3] == -100)


def test_the_record_carries_the_frames_training_used(capsys):
    """A run's media settings go into its record; generation takes the frames per video from there (not its own
    default of 8), and a flag that differs from the record says so once."""
    rec = ModelRecord(vision={"image_size": 56})

    class Trained:  # the run trained with --num-frames 2
        num_frames = 2

    rec.media = training_media(rec, media_settings(rec, Trained()))
    assert rec.media["num_video_frames"] == 2 and rec.media["frame_sampling"] == "uniform"
    assert rec.media["image_size"] == 56 and rec.media["image_aspect_ratio"] == "pad"
    assert ModelRecord.from_json(rec.to_json()).media == rec.media  # it survives the checkpoint's JSON

    class Generate:  # generation without --num-frames
        num_frames = None

    assert media_settings(rec, Generate())["num_frames"] == 2
    assert media_settings(rec)["num_frames"] == 2
    capsys.readouterr()

    class Asked:  # generation with --num-frames 8
        num_frames = 8

    assert media_settings(rec, Asked())["num_frames"] == 8
    assert media_settings(rec, Asked())["num_frames"] == 8
    out = capsys.readouterr().out
    assert out.count("trained with 2") == 1, out
