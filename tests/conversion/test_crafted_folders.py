"""A converter that trusts no folder (in-process): every crafted-folder case is refused with a message naming what
is wrong, and leaves the file system as it was (every file's path, kind, size, mtime and link target, before and
after: nothing in the source, no target, no `.<name>.partial-<pid>` staging sibling, no parent folder made).

Cases: an index naming `../x`, an absolute path or a subfolder (also through tools/convert_checkpoint.py's main: exit
status 2, one line naming the index and the entry); a weight file or a non-weight file that is a symlink out of the
source; safetensors headers with overlapping or gapped offsets, a negative dimension or trailing bytes (read), and a
reused header with crafted offsets (written); a target that is, contains or lies inside the source, --overwrite or
not; a conversion failing after it started writing (its staging folder and the parent folders it made removed); an
export whose record names a path out of the target. An asset over 64 MiB (a sparse file: no disk used) is skipped
with a warning, and the folder still converts.
"""

import importlib.util
import json
import os
import shutil
import struct

import pytest
import torch

from megatron_longvila.errors import ConversionError

from .fixtures import make_vila

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def vila(tmp_path_factory):
    return make_vila(str(tmp_path_factory.mktemp("crafted")), "qwen2_tied")


def _snapshot(root):
    """Every path under root: kind, size, mtime (files), link target (symlinks)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            if os.path.islink(p):
                out[p] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[p] = ("dir",)
            else:
                out[p] = ("file", st.st_size, st.st_mtime_ns)
    return out


def _refused_leaving_all(tmp_path, match, exc=ConversionError, **kwargs):
    from megatron_longvila.conversion import convert

    before = _snapshot(tmp_path)
    with pytest.raises(exc, match=match) as e:
        convert(progress=False, **kwargs)
    assert _snapshot(tmp_path) == before
    return str(e.value)


def _tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", os.path.join(ROOT, "tools",
                                                                                     "convert_checkpoint.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _retarget_index(src, entry):
    """Make the LLM index name `entry` (as written) for the tensors of its first shard."""
    path = os.path.join(src, "llm", INDEX)
    index = json.load(open(path))
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (entry if v == first else v) for k, v in index["weight_map"].items()}
    json.dump(index, open(path, "w"))
    return os.path.join(src, "llm", first), path


def test_index_entries_must_be_plain_file_names(vila, tmp_path, capsys):
    tool = _tool()
    out = tmp_path / "not_made" / "target"
    for case in ("dotdot", "absolute", "subfolder"):
        src = shutil.copytree(vila, tmp_path / case)
        shard = sorted(f for f in os.listdir(src / "llm") if f.endswith(".safetensors"))[0]
        # A real copy of the shard where the entry points: without the check the reader would open it.
        if case == "dotdot":
            entry = "../" + shard
            shutil.copy(src / "llm" / shard, src / shard)
        elif case == "absolute":
            entry = str(tmp_path / f"abs_{shard}")
            shutil.copy(src / "llm" / shard, entry)
        else:
            entry = "sub/" + shard
            os.makedirs(src / "llm" / "sub")
            shutil.copy(src / "llm" / shard, src / "llm" / "sub" / shard)
        _, index = _retarget_index(str(src), entry)
        msg = _refused_leaving_all(tmp_path, r"names .*plain file name", source=str(src), target=str(out),
                                   target_format="mcore")
        assert f"{index} names {entry!r}" in msg
        before = _snapshot(tmp_path)
        rc = tool.main(["--source", str(src), "--target", str(out), "--target-format", "hf", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and f"{index} names {entry!r}" in err and err.count("\n") == 1, (rc, err)
        assert _snapshot(tmp_path) == before


def test_symlinks_out_of_the_source_are_refused(vila, tmp_path):
    out = str(tmp_path / "target")
    src = shutil.copytree(vila, tmp_path / "weights_link")
    shard = sorted(f for f in os.listdir(src / "llm") if f.endswith(".safetensors"))[0]
    shutil.move(src / "llm" / shard, tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", src / "llm" / shard)
    msg = _refused_leaving_all(tmp_path, r"symlink to .*outside", source=str(src), target=out, target_format="mcore")
    assert "a weight file" in msg and shard in msg

    src = shutil.copytree(vila, tmp_path / "asset_link")
    (tmp_path / "secret.txt").write_text("not for export")
    os.remove(src / "llm" / "merges.txt")
    os.symlink(tmp_path / "secret.txt", src / "llm" / "merges.txt")
    msg = _refused_leaving_all(tmp_path, r"symlink to .*secret.txt.*outside", source=str(src), target=out,
                               target_format="hf")
    assert "a non-weight file" in msg

    # A symlink that stays inside the source is an ordinary file.
    from megatron_longvila.conversion import read_record

    src = shutil.copytree(vila, tmp_path / "inner_link")
    shutil.move(src / "llm" / "merges.txt", src / "merges_copy.txt")
    os.symlink(src / "merges_copy.txt", src / "llm" / "merges.txt")
    assert read_record(str(src)).assets["llm/merges.txt"] == (src / "merges_copy.txt").read_bytes()


def test_large_assets_are_skipped_with_a_warning(vila, tmp_path, caplog):
    from megatron_longvila.conversion import read_record
    from megatron_longvila.conversion.hf_common import MAX_ASSET_BYTES

    src = shutil.copytree(vila, tmp_path / "big")
    with open(src / "llm" / "training_log.txt", "wb") as f:
        f.truncate(MAX_ASSET_BYTES + 1)  # sparse: nothing is written to disk
    with caplog.at_level("WARNING", logger="megatron_longvila.conversion"):
        record = read_record(str(src))
    assert "llm/training_log.txt" not in record.assets and "llm/merges.txt" in record.assets
    assert any("training_log.txt: skipped" in r.getMessage() and "64 MiB" in r.getMessage() for r in caplog.records)


def _raw_safetensors(path, header, data_bytes):
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"\0" * data_bytes)


@pytest.mark.parametrize("case,header,data,match", [
    ("overlap", {"a": [0, 16], "b": [8, 24]}, 24, r"'b' at offsets 8..24 overlaps"),
    ("gap", {"a": [0, 16], "b": [20, 36]}, 36, r"'b' at offsets 20..36 leaves a gap of 4 bytes"),
    ("negative", {"a": [0, 16], "b": [16, 32], "shape_b": [-2, -2]}, 32, r"'b' has a negative dimension \[-2, -2\]"),
    ("trailing", {"a": [0, 16], "b": [16, 32]}, 48, r"end at byte 32 of a 48-byte data section"),
])
def test_crafted_headers_are_refused_by_the_reader(tmp_path, case, header, data, match):
    from megatron_longvila.conversion.storage import SafetensorsFile

    shape_b = header.pop("shape_b", [4])
    entries = {n: {"dtype": "F32", "shape": shape_b if n == "b" else [4], "data_offsets": o} for n, o in header.items()}
    path = tmp_path / f"{case}.safetensors"
    _raw_safetensors(path, entries, data)
    with pytest.raises(ConversionError, match=match):
        SafetensorsFile(str(path))


def test_crafted_header_in_a_folder_and_a_reused_header_with_crafted_offsets(vila, tmp_path):
    from megatron_longvila.conversion.storage import SafetensorsFile, SafetensorsWriter

    src = shutil.copytree(vila, tmp_path / "gap")
    proj = src / "mm_projector" / "model.safetensors"
    sf = SafetensorsFile(str(proj))
    header = json.loads(sf.header_text)
    sf.close()
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    header[last]["data_offsets"] = [o + 8 for o in header[last]["data_offsets"]]
    body = open(proj, "rb").read()[sf.data_start:]
    last_begin = header[last]["data_offsets"][0] - 8
    body = body[:last_begin] + b"\0" * 8 + body[last_begin:]
    text = json.dumps(header).encode()
    with open(proj, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + body)
    _refused_leaving_all(tmp_path, r"mm_projector/model.safetensors: tensor .* leaves a gap of 8 bytes",
                         source=str(src), target=str(tmp_path / "t"), target_format="hf")

    # A record's header reused on export: names, dtypes and shapes fit, offsets crafted (a far offset would make a
    # huge sparse file); refused before the file is created.
    entries = [("a", torch.float32, (4,)), ("b", torch.float32, (4,))]
    crafted = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                          "b": {"dtype": "F32", "shape": [4], "data_offsets": [2**40, 2**40 + 16]}})
    with pytest.raises(ConversionError, match=r"'b' at offsets .* leaves a gap"):
        SafetensorsWriter(str(tmp_path / "w.safetensors"), entries, header_text=crafted)
    assert not os.path.exists(tmp_path / "w.safetensors")


def test_targets_overlapping_the_source_are_refused(vila, tmp_path):
    src = shutil.copytree(vila, tmp_path / "parent" / "src")
    for overwrite in (False, True):
        _refused_leaving_all(tmp_path, r"is the source folder", source=str(src), target=str(src),
                             target_format="hf", overwrite=overwrite)
        _refused_leaving_all(tmp_path, r"contains the source", source=str(src), target=str(tmp_path / "parent"),
                             target_format="hf", overwrite=overwrite)
        _refused_leaving_all(tmp_path, r"lies inside the source", source=str(src), target=str(src / "llm"),
                             target_format="mcore", overwrite=overwrite)
        _refused_leaving_all(tmp_path, r"lies inside the source", source=str(src), target=str(src / "new" / "x"),
                             target_format="mcore", overwrite=overwrite)
    # Through a symlink to the source's parent: the same folder, refused alike.
    os.symlink(tmp_path / "parent", tmp_path / "alias")
    _refused_leaving_all(tmp_path, r"contains the source", source=str(src), target=str(tmp_path / "alias"),
                         target_format="hf", overwrite=True)


def test_a_failure_after_writing_began_leaves_nothing(vila, tmp_path):
    src = shutil.copytree(vila, tmp_path / "src")
    count = [0]

    def fail(name):
        count[0] += 1
        if count[0] == 3:
            raise ConversionError("stop here (test)")

    for fmt in ("hf", "mcore"):  # (torch_dist's writer wraps the error in its CheckpointException, a BaseException)
        count[0] = 0
        _refused_leaving_all(tmp_path, r"stop here|CheckpointException", BaseException, source=str(src),
                             target=str(tmp_path / "a" / "b" / "t"), target_format=fmt, hooks={"after_tensor": fail})
        assert count[0] == 3


def test_an_export_never_writes_outside_its_target(vila, tmp_path):
    from megatron_longvila.conversion import open_source
    from megatron_longvila.conversion.hf_common import write_hf_vila

    for what, edit in (("asset", lambda r: r.assets.__setitem__("../escaped.txt", b"x")),
                       ("shard", lambda r: r.hf["safetensors"].__setitem__(
                           "llm/../escaped.safetensors", r.hf["safetensors"].pop(sorted(
                               k for k in r.hf["safetensors"] if k.startswith("llm/"))[0])))):
        root = tmp_path / what / "out"
        os.makedirs(root)
        with open_source(vila) as src:
            edit(src.record)
            with pytest.raises(ConversionError, match=r"not a relative path inside the target"):
                write_hf_vila(src, str(root))
        assert not os.path.exists(tmp_path / what / "escaped.txt")
        assert not os.path.exists(root / "escaped.safetensors")
        assert not os.path.exists(tmp_path / what / "escaped.safetensors")
