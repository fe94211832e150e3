import pytest

from megatron_longvila.errors import DataError
from megatron_longvila.data.frames import select_frame_indices


def test_uniform_includes_first_and_last():
    assert select_frame_indices(100, 25.0, num_frames=5) == [0, 25, 50, 74, 99]
    assert select_frame_indices(10, 25.0, num_frames=10) == list(range(10))


def test_uniform_more_frames_than_video_repeats_to_keep_count():
    idx = select_frame_indices(3, 30.0, num_frames=6)
    assert len(idx) == 6 and idx == sorted(idx) and set(idx) == {0, 1, 2}


def test_fps_sampling_and_cap():
    # 10 s at 30 fps sampled at 2 fps: every 15th frame.
    assert select_frame_indices(300, 30.0, fps=2.0) == list(range(0, 300, 15))
    capped = select_frame_indices(300, 30.0, fps=2.0, max_frames=4)
    assert len(capped) == 4 and capped[0] == 0 and capped[-1] == 285
    # Asking for a higher rate than the video's gives every frame once.
    assert select_frame_indices(20, 10.0, fps=50.0) == list(range(20))


def test_time_window():
    # Frames starting in [1 s, 2 s) at 10 fps are 10..19.
    assert select_frame_indices(50, 10.0, start_s=1.0, end_s=2.0) == list(range(10, 20))
    assert select_frame_indices(50, 10.0, num_frames=2, start_s=1.0, end_s=2.0) == [10, 19]
    assert select_frame_indices(50, 10.0, start_s=4.55) == list(range(46, 50))


def test_all_frames_capped():
    assert select_frame_indices(1000, 30.0, max_frames=3) == [0, 500, 999]


def test_zero_frames_and_empty_window_are_data_errors():
    with pytest.raises(DataError) as e:
        select_frame_indices(0, 30.0, num_frames=4)
    assert e.value.reason == "zero_frames"
    with pytest.raises(DataError) as e:
        select_frame_indices(30, 30.0, num_frames=4, start_s=5.0)
    assert e.value.reason == "zero_frames"


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError):
        select_frame_indices(10, 30.0, num_frames=2, fps=1.0)
    with pytest.raises(ValueError):
        select_frame_indices(10, 30.0, num_frames=0)
    with pytest.raises(ValueError):
        select_frame_indices(10, 0.0, num_frames=2)
