"""The inference tools' mistakes answered in one line, before torch is imported and before any rank starts.

examples/generate_longvila.py and tools/eval_vniah.py run as subprocesses under a small probe that records, when the
tool exits, whether torch or megatron-core were ever imported (sys.modules). Each mistake must give status 2 and
exactly one stderr line `error: ArgumentError: ...` naming the flag and what to give instead, on stdout nothing,
in less time than importing torch takes (measured once here, on the same machine and load); --help prints its usage
the same way. Under torchrun (RANK and WORLD_SIZE set) the message comes from rank 0 alone. Folder recognition
matches conversion.load.detect_format, the format rules the loaders apply after the check.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from megatron_longvila.checkpoint.layout import TRACKER
from megatron_longvila.checkpoint.locate import HF_VILA_COMPONENTS, checkpoint_format, check_checkpoint_folder
from megatron_longvila.errors import ArgumentError
from megatron_longvila.parallel.sizes import launch_world_size, parallel_sizes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GENERATE = os.path.join(ROOT, "examples", "generate_longvila.py")
VNIAH = os.path.join(ROOT, "tools", "eval_vniah.py")
HEAVY = ("torch", "megatron.core", "transformers")

# Runs the tool as __main__ (its own sys.path set-up and run_main), then writes what it imported to PROBE_OUT.
PROBE = """
import json, os, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code
with open(os.environ["PROBE_OUT"], "w") as f:
    json.dump(sorted(m for m in %r if m in sys.modules), f)
sys.exit(code)
""" % (HEAVY,)


@pytest.fixture(scope="module")
def torch_import_s():
    """Seconds a fresh interpreter takes to import torch here (the bound a one-line answer must stay well under)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, timeout=120)
    return time.perf_counter() - t0


def _mcore(path):
    """A project checkpoint's file names (what the check looks at): the tracker and an iteration folder."""
    it = os.path.join(path, "iter_0000150")
    os.makedirs(it)
    for name in (".metadata", "metadata.json"):
        open(os.path.join(it, name), "w").close()
    with open(os.path.join(path, TRACKER), "w") as f:
        f.write("150")
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A folder laid out as the demo's: its checkpoint one level down, in checkpoints/, beside data/."""
    root = tmp_path_factory.mktemp("longvila_demo")
    _mcore(str(root / "checkpoints"))
    os.makedirs(root / "data" / "videos")
    video = root / "data" / "videos" / "heldout_000.mp4"
    video.write_bytes(b"\0" * 16)  # only its presence is checked before launch
    return root


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_ERROR_FILE", "MEGATRON_LONGVILA_RANK")}
    env.update(extra)
    return env


def _run(tool, args, tmp_path, **env):
    out = str(tmp_path / "probe.json")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", PROBE, tool, *args], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, env=_clean_env(PROBE_OUT=out, **env))
    elapsed = time.perf_counter() - t0
    with open(out) as f:
        heavy = json.load(f)
    return r, elapsed, heavy


def _one_line(r, elapsed, heavy, torch_s, *needles):
    assert heavy == [], f"imported {heavy} before answering: {r.stderr[-2000:]}"
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ArgumentError: "), r.stderr
    assert r.stdout == ""
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert elapsed < torch_s, f"{elapsed:.2f}s to answer, importing torch takes {torch_s:.2f}s"
    return lines[0]


def _mistakes(demo):
    ckpt, video = str(demo / "checkpoints"), str(demo / "data" / "videos" / "heldout_000.mp4")
    q = ["--prompt", "What happens in the video?"]
    return {
        "load_names_the_demo_folder": (
            GENERATE, ["--cpu-ranks", "4", "--load", str(demo), "--video", video, *q],
            [f"--load {demo}: not a checkpoint folder, but {ckpt} holds one", f"give --load {ckpt}"]),
        "load_missing": (GENERATE, ["--cpu-ranks", "1", "--load", str(demo / "nope"), *q], ["no such folder"]),
        "load_not_given": (GENERATE, ["--cpu-ranks", "1", *q], ["required: --load", "(see --help)"]),
        "video_missing": (
            GENERATE, ["--cpu-ranks", "4", "--load", ckpt, "--video", str(demo / "clip.mp4"), *q],
            [f"--video {demo / 'clip.mp4'}: no such file"]),
        "mesh_against_ranks": (
            GENERATE, ["--cpu-ranks", "2", "--hierarchical-context-parallel-sizes", "2", "2", "--load", ckpt, *q],
            ["--hierarchical-context-parallel-sizes 2 2 ask for 4", "the 2 ranks of --cpu-ranks 2", "launch 4 ranks"]),
        "no_launcher": (GENERATE, ["--load", ckpt, *q], ["no launcher", "--cpu-ranks N"]),
        "sampling": (GENERATE, ["--cpu-ranks", "1", "--load", ckpt, "--top-p", "0", *q], ["0 < top-p <= 1"]),
        "vniah_load_names_the_demo_folder": (
            VNIAH, ["--cpu-ranks", "4", "--load", str(demo), "--synthetic-haystack", "--out", str(demo / "v")],
            [f"give --load {ckpt}"]),
        "vniah_haystack_missing": (
            VNIAH, ["--cpu-ranks", "4", "--load", ckpt, "--haystack-video", str(demo / "movie.mp4"), "--out",
                    str(demo / "v")], ["--haystack-video", "no such file"]),
        "vniah_needles_without_json": (
            VNIAH, ["--cpu-ranks", "1", "--load", ckpt, "--synthetic-haystack", "--needles", str(demo / "data"),
                    "--out", str(demo / "v")], ["--needles", "no needles.json"]),
        "vniah_modes": (
            VNIAH, ["--cpu-ranks", "1", "--load", ckpt, "--synthetic-haystack", "--modes", "teacher,greedy", "--out",
                    str(demo / "v")], ["--modes teacher,greedy"]),
        "vniah_tp_against_ranks": (
            VNIAH, ["--cpu-ranks", "4", "--tensor-model-parallel-size", "3", "--load", ckpt, "--synthetic-haystack",
                    "--out", str(demo / "v")], ["not a multiple of --tensor-model-parallel-size 3"]),
    }


CASES = ["load_names_the_demo_folder", "load_missing", "load_not_given", "video_missing", "mesh_against_ranks",
         "no_launcher", "sampling", "vniah_load_names_the_demo_folder", "vniah_haystack_missing",
         "vniah_needles_without_json", "vniah_modes", "vniah_tp_against_ranks"]


@pytest.mark.parametrize("case", CASES)
def test_mistake_answered_in_one_line_before_torch(case, demo, tmp_path, torch_import_s):
    tool, args, needles = _mistakes(demo)[case]
    _one_line(*_run(tool, args, tmp_path), torch_import_s, *needles)


@pytest.mark.parametrize("tool", [GENERATE, VNIAH], ids=["generate_longvila", "eval_vniah"])
def test_help_before_torch(tool, tmp_path, torch_import_s):
    r, elapsed, heavy = _run(tool, ["--help"], tmp_path)
    assert r.returncode == 0 and heavy == [] and r.stderr == "", (heavy, r.stderr[-2000:])
    assert r.stdout.startswith("usage: ") and "--cpu-ranks" in r.stdout
    assert elapsed < torch_import_s, (elapsed, torch_import_s)


def test_under_torchrun_once_from_rank_0(demo, tmp_path, torch_import_s):
    """Every rank of a torchrun job runs the check alike; rank 0 prints the one line, the others only exit 2."""
    args = ["--tensor-model-parallel-size", "3", "--load", str(demo / "checkpoints"), "--prompt", "q"]
    lines = {}
    for rank in ("0", "1"):
        r, elapsed, heavy = _run(GENERATE, args, tmp_path, RANK=rank, WORLD_SIZE="2", LOCAL_RANK=rank)
        assert r.returncode == 2 and heavy == [] and r.stdout == "", (rank, r.returncode, heavy, r.stderr)
        lines[rank] = r.stderr.splitlines()
    assert lines["1"] == []
    assert lines["0"] == ["error: ArgumentError: torchrun's 2 ranks are not a multiple of "
                          "--tensor-model-parallel-size 3"]
    # --cpu-ranks asks for CPU ranks started here: under torchrun it is refused, not ignored.
    r = _run(GENERATE, ["--cpu-ranks", "2", "--load", str(demo / "checkpoints"), "--prompt", "q"], tmp_path,
             RANK="0", WORLD_SIZE="2")
    _one_line(*r, torch_import_s, "--cpu-ranks 2 under torchrun", "drop --cpu-ranks")


# ------------------------------------------------------------------------------------------------------
# The checks themselves, in process
# ------------------------------------------------------------------------------------------------------

def test_folder_formats_match_the_loaders(tmp_path):
    """checkpoint_format answers as conversion.load.detect_format (the loaders' rule) on each format's file names, and
    the hint names the sub-folder that holds a checkpoint."""
    from megatron_longvila.conversion.load import detect_format
    from megatron_longvila.conversion.mappings import COMPONENTS
    from megatron_longvila.errors import ConversionError

    assert HF_VILA_COMPONENTS == COMPONENTS
    hf = tmp_path / "hf"
    for c in COMPONENTS:
        os.makedirs(hf / c)
    (hf / "config.json").write_text("{}")
    nemo = tmp_path / "nemo"
    os.makedirs(nemo / "context")
    os.makedirs(nemo / "weights")
    mcore = _mcore(str(tmp_path / "outer" / "checkpoints"))
    folders = {"hf": str(hf), "nemo": str(nemo), "mcore": mcore, "iteration": os.path.join(mcore, "iter_0000150")}
    for name, path in folders.items():
        assert checkpoint_format(path) == detect_format(path), name
        assert check_checkpoint_folder(path) == detect_format(path)
    outer = str(tmp_path / "outer")
    assert checkpoint_format(outer) is None
    with pytest.raises(ConversionError):
        detect_format(outer)
    with pytest.raises(ArgumentError, match=f"but {mcore} holds one .this project's torch_dist.: give --load {mcore}"):
        check_checkpoint_folder(outer)
    # A folder of iterations without its tracker: the hint names the iteration folder.
    os.remove(os.path.join(mcore, TRACKER))
    with pytest.raises(ArgumentError, match="give --pretrained-checkpoint .*iter_0000150$"):
        check_checkpoint_folder(mcore, "--pretrained-checkpoint")
    # A tracker that names a missing iteration: refused with the tracker's path and the iteration it names.
    with open(os.path.join(mcore, TRACKER), "w") as f:
        f.write("7")
    with pytest.raises(ArgumentError, match="names iteration 7"):
        check_checkpoint_folder(mcore)


def test_parallel_sizes_rules():
    assert parallel_sizes(8, 1, None, None) == (1, 8, [8, 1])
    assert parallel_sizes(8, 2, None, [2, 2]) == (2, 4, [2, 2])
    assert parallel_sizes(8, 1, 4, [2, 2]) == (1, 4, [2, 2])  # two data-parallel replicas
    for world, tp, cp, hier, msg in ((6, 4, None, None, "not a multiple of --tensor-model-parallel-size 4"),
                                     (8, 1, 4, [4, 2], "multiply to 8, not to --context-parallel-size 4"),
                                     (8, 1, 3, None, "not a multiple of TP x CP = 1 x 3"),
                                     (4, 0, None, None, "--tensor-model-parallel-size 0"),
                                     (4, 1, None, [0, 4], "sizes of 1 or more")):
        with pytest.raises(ArgumentError, match=msg.replace("(", r"\(")):
            parallel_sizes(world, tp, cp, hier)
    assert launch_world_size(3, {}) == 3
    assert launch_world_size(None, {"RANK": "0", "WORLD_SIZE": "16"}) == 16
    with pytest.raises(ArgumentError, match="--cpu-ranks 0"):
        launch_world_size(0, {})
    with pytest.raises(ArgumentError, match="WORLD_SIZE"):
        launch_world_size(None, {"RANK": "0"})
