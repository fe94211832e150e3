import pytest
import torch

from megatron_longvila.data import video
from megatron_longvila.errors import BackendUnavailableError, DataError
from megatron_longvila.data.video import decode_frames, probe_video
from tests.data.media import gray_level

pytest.importorskip("av", reason="PyAV (pip install av) is the CPU decoder these tests exercise")


def _sequential(path):
    """Every frame, decoded front to back without seeking: the reference."""
    import av

    with av.open(path) as c:
        return torch.stack([video._frame_to_rgb(f) for f in c.decode(video=0)])


@pytest.mark.parametrize("name,codec", [("h264", "h264"), ("vp9", "vp9"), ("mjpeg", "mjpeg")])
def test_probe(videos, name, codec):
    info = probe_video(videos[name])
    assert (info.num_frames, info.fps, info.width, info.height, info.codec) == (48, 24.0, 64, 48, codec)
    assert info.duration_s == pytest.approx(2.0)


@pytest.mark.parametrize("name", ["h264", "vp9", "mjpeg"])
def test_decoded_frames_show_the_right_picture(videos, name):
    idx = [0, 7, 8, 23, 47]
    x = decode_frames(videos[name], idx, backend="pyav")
    assert x.dtype == torch.uint8 and x.shape == (5, 48, 64, 3)
    # Below the white square each frame is flat grey at its own level (lossless encodes: within 1).
    got = x[:, 16:].float().mean(dim=(1, 2, 3))
    want = torch.tensor([float(gray_level(i)) for i in idx])
    assert (got - want).abs().max() <= 1.0
    # The white square sits at column 2*i: a wrong frame would show it elsewhere.
    for row, i in zip(x, idx):
        assert row[5, 2 * i % 56 + 4].min() >= 240  # MJPEG is lossy at the square's edges


def test_selected_frames_equal_sequential_decode_with_seeks(videos):
    path = videos["h264_long"]  # 240 frames, keyframe every 30, B-frames
    ref = _sequential(path)
    idx = [5, 3, 119, 120, 121, 239, 60, 60, 200]
    video.DECODE_STATS.clear()
    x = decode_frames(path, idx, backend="pyav")
    assert torch.equal(x, ref[idx])
    # Far-apart targets are reached by seeking, so far fewer pictures are decoded than the 240 in the file.
    assert video.DECODE_STATS["seeks"] >= 2
    assert video.DECODE_STATS["decoded"] < 150


def test_vp9_and_mjpeg_selected_equal_sequential(videos):
    for name in ("src_vp9", "src_mjpeg", "src_h264"):
        ref = _sequential(videos[name])
        idx = [0, 13, 14, 40, 47]
        assert torch.equal(decode_frames(videos[name], idx, backend="pyav"), ref[idx]), name


@pytest.mark.parametrize(
    "name,reason",
    [
        ("missing", "missing_file"),
        ("empty", "empty_file"),
        ("corrupt", "corrupt_video"),
        ("truncated_mp4", "truncated_video"),
        ("truncated_faststart", "truncated_video"),
        ("truncated_webm", "truncated_video"),
        ("zero", "zero_frames"),
        ("audio", "no_video_stream"),
        ("png", "unsupported_codec"),
    ],
)
def test_bad_videos_raise_their_reason(videos, name, reason):
    with pytest.raises(DataError) as e:
        probe_video(videos[name])
    assert e.value.reason == reason
    with pytest.raises(DataError) as e:
        decode_frames(videos[name], [0])
    assert e.value.reason == reason


def test_too_long(videos):
    with pytest.raises(DataError) as e:
        probe_video(videos["h264"], max_frames=47)
    assert e.value.reason == "too_long"
    with pytest.raises(DataError) as e:
        probe_video(videos["h264"], max_duration_s=1.5)
    assert e.value.reason == "too_long"
    assert probe_video(videos["h264"], max_frames=48, max_duration_s=2.0).num_frames == 48


def test_out_of_range_index_is_a_caller_error(videos):
    with pytest.raises(ValueError):
        decode_frames(videos["h264"], [48])


def test_dali_gpu_without_gpu_is_a_clear_error(videos):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the unavailability path cannot be shown")
    with pytest.raises(BackendUnavailableError, match="dali|DALI|GPU"):
        decode_frames(videos["vp9"], [0], backend="dali_gpu")


def test_dali_cpu_rejects_h264_as_unsupported_codec(videos):
    if not video.dali_available():
        with pytest.raises(BackendUnavailableError, match="nvidia-dali"):
            decode_frames(videos["h264"], [0], backend="dali_cpu")
        return
    with pytest.raises(DataError) as e:
        decode_frames(videos["h264"], [0], backend="dali_cpu")
    assert e.value.reason == "unsupported_codec"


@pytest.mark.parametrize("name", ["src_vp9", "src_mjpeg", "vp9", "mjpeg"])
def test_dali_cpu_matches_pyav(videos, name):
    if not video.dali_available():
        pytest.skip("NVIDIA DALI not installed (pip install nvidia-dali-cuda130): its CPU decoder is untested here")
    idx = [0, 5, 13, 30, 47, 5]
    a = decode_frames(videos[name], idx, backend="pyav").int()
    b = decode_frames(videos[name], idx, backend="dali_cpu").int()
    assert a.shape == b.shape
    # Same YUV->RGB conversion on both sides; the stated tolerance is 1 grey level (rounding).
    assert (a - b).abs().max() <= 1
