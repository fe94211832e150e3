import os

import pytest

from tests.data import media


@pytest.fixture(scope="session")
def ffmpeg():
    exe = media.ffmpeg_exe()
    if exe is None:
        pytest.skip("no ffmpeg binary: pip install imageio-ffmpeg or apt-get install ffmpeg")
    return exe


@pytest.fixture(scope="session")
def videos(ffmpeg, tmp_path_factory):
    """A set of good and bad media files, generated once per session."""
    d = tmp_path_factory.mktemp("videos")
    p = lambda name: str(d / name)  # noqa: E731
    v = {
        "h264": media.make_gray_video(p("gray_h264.mp4"), "h264"),
        "vp9": media.make_gray_video(p("gray_vp9.webm"), "vp9"),
        "mjpeg": media.make_gray_video(p("gray_mjpeg.avi"), "mjpeg"),
        "h264_long": media.make_gray_video(p("long_h264.mp4"), "h264", num_frames=240, gop=30),
        "h264_faststart": media.make_gray_video(p("fs_h264.mp4"), "h264", extra=["-movflags", "+faststart"]),
        "src_vp9": media.make_testsrc_video(p("src_vp9.webm"), "vp9"),
        "src_mjpeg": media.make_testsrc_video(p("src_mjpeg.avi"), "mjpeg"),
        "src_h264": media.make_testsrc_video(p("src_h264.mp4"), "h264"),
        "png": media.make_gray_video(p("gray_png.mkv"), "png", num_frames=12),
        "zero": media.make_zero_frame_video(p("zero.webm")),
        "audio": media.make_audio_only(p("audio.m4a")),
        "image": media.make_image(p("img.png")),
        "image2": media.make_image(p("img2.jpg"), size=(30, 50), color=(0, 0, 255)),
    }
    v["truncated_mp4"] = media.truncate(v["h264"], p("trunc.mp4"))
    v["truncated_faststart"] = media.truncate(v["h264_faststart"], p("trunc_fs.mp4"))
    v["truncated_webm"] = media.truncate(v["vp9"], p("trunc.webm"))
    v["empty"] = media.write(p("empty.mp4"), b"")
    v["corrupt"] = media.write(p("corrupt.mp4"), os.urandom(4096))
    v["corrupt_image"] = media.write(p("corrupt.png"), b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    v["missing"] = p("does_not_exist.mp4")
    return v


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from megatron_longvila.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    d = tmp_path_factory.mktemp("sp")
    lines = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(200)]
    lines += ["What is happening in the video? A person walks a dog in the park.", "Describe the image."] * 50
    return SentencePieceTokenizer(train_sentencepiece(lines, d / "tiny", vocab_size=320))
