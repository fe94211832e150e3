"""The model's meaning kept both ways between the project and Hugging Face VILA's layout.

- The demo's model configuration (siglip_tiny with VILA's encoder semantics, the tiny LLM, the byte tokenizer, two
  frames without separator), saved by the project with random weights, exported to VILA's layout and read back:
  the same record (tokenizer facts, media settings and registry names included), the same per-token losses and the
  same greedy answer (one 1-rank launch; the same fp32 weights through the same code: compared exactly).
- An export VILA would run differently is refused with the reason, before anything is written: the old demo
  encoder (post-LayerNorm run after the last layer), a projector epsilon VILA does not use, the project's
  <frame_sep> token; a source config.json whose frame separator or select layer disagrees with the model.
- A frame separator VILA's config can say (none) is written in its media encoders' `end_tokens` and read back.
- A missing mm_vision_select_feature or mm_vision_select_layer is refused as VILA's loader fails on it (its config
  classes set both to None); NVILA's temporal-pooling video encoder is refused by its key.
- Vocabulary rows an export drops: refused when a token of the model's tokenizer has learned values there; allowed
  when they are zero (as a VILA conversion pads) or no token has their id (Megatron's padding).
- A model trained from a release (frames per video changed, VILA's uniform sampling recorded) exports the release's
  files and configs, no facts file.
"""

import json
import os
import shutil

import pytest
import torch

from megatron_longvila.conversion.source import Source
from megatron_longvila.parallel.launch import run_distributed

from .fixtures import make_vila

pytest.importorskip("transformers")

NEW_TOKENS = 6
RECORD_FIELDS = ("llm_type", "llm", "padded_vocab_size", "rope_theta", "rope_scaling", "vision_type", "vision",
                 "vision_select_layer", "projector_type", "projector", "token_order", "tokenizer", "registry_names")


def _demo_record():
    """The record a `make demo` run writes (examples/pretrain_longvila.py DEMO_FLAGS: siglip_tiny, tiny, bytes,
    two frames, no frame separator, chatml)."""
    from dataclasses import replace

    from megatron_longvila.data.tokenizer import load_tokenizer
    from megatron_longvila.models.record import media_settings, record_of, training_media
    from megatron_longvila.models.registry import ENCODERS, LLMS
    from megatron_longvila.training.providers import _tokenizer_facts

    tok = load_tokenizer(None)
    shape = replace(LLMS["tiny"], vocab_size=-(-max(LLMS["tiny"].vocab_size, tok.vocab_size) // 128) * 128)
    rec = record_of(shape, ENCODERS["siglip_tiny"], real_vocab_size=max(LLMS["tiny"].vocab_size, tok.vocab_size),
                    tokenizer=_tokenizer_facts(tok, "chatml"), registry_names={"llm": "tiny", "vision": "siglip_tiny"})

    class Args:
        num_frames = 2

    rec.media = training_media(rec, media_settings(rec, Args()))
    return rec


def _demo_samples(rec, seed):
    """A 2-frame video and a text-only sample in the demo's layout (byte text, no frame separator), every text token
    learned."""
    from megatron_longvila.models.longvila import IGNORE_INDEX, LongVILASample, Media

    g = torch.Generator().manual_seed(seed)
    v = rec.vision_config()
    tpf = ((v.grid + 1) // 2) ** 2
    media_id = int(rec.tokenizer["media_token_id"])
    out = []
    for frames, n_text in ((2, 9), (0, 11)):
        ids = torch.randint(0, 256, (5,), generator=g).tolist()
        pos = []
        for _ in range(frames):
            pos.append(list(range(len(ids), len(ids) + tpf)))
            ids += [media_id] * tpf
        ids += torch.randint(0, 256, (n_text,), generator=g).tolist()
        ids_t = torch.tensor(ids)
        labels = torch.where(ids_t == media_id, torch.full_like(ids_t, IGNORE_INDEX), ids_t)
        media = [Media(token_positions=torch.tensor(pos), kind="video",
                       frames=torch.randn(frames, 3, v.image_size, v.image_size, generator=g))] if frames else []
        out.append(LongVILASample(input_ids=ids_t, labels=labels, media=media))
    return out


def _save_and_compare(rank, world, root):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_longvila.checkpoint.distributed import save_checkpoint
    from megatron_longvila.conversion import convert, load_longvila
    from megatron_longvila.inference import generate
    from megatron_longvila.batch.microbatch import plan_microbatch
    from megatron_longvila.models.longvila import MicroBatch
    from megatron_longvila.models.registry import build_longvila
    from megatron_longvila.parallel.mesh import single_rank_mesh
    from megatron_longvila.parallel.state import initialize_mmsp
    from megatron_longvila.runtime.cpu import enable_cpu_runtime

    enable_cpu_runtime()
    ps.initialize_model_parallel()
    torch.manual_seed(11)
    model_parallel_cuda_manual_seed(11)
    rec = _demo_record()
    model = build_longvila(encoder=rec.vision_config(), llm=rec.llm_shape(),
                           media_token_id=rec.tokenizer["media_token_id"], real_vocab_size=rec.llm["vocab_size"])
    with torch.no_grad():  # norms and biases away from their init, so every tensor's mapping matters
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.record = rec
    ckpt = os.path.join(root, "demo_ckpt")
    save_checkpoint(ckpt, 1, model, None, None, data_state=None, train_state={})
    saved = os.path.join(ckpt, "iter_0000001")
    hf = convert(source=ckpt, target=os.path.join(root, "demo_hf"), target_format="hf", progress=False)["target"]
    mesh = single_rank_mesh()
    out = {"saved": saved, "hf": hf, "runs": {}}
    for name, path in (("project", ckpt), ("hf", hf)):
        m = load_longvila(path)
        m.eval()
        initialize_mmsp(m.config)
        batch = _demo_samples(m.record, seed=5)
        planned = plan_microbatch(m.visual_spec, MicroBatch.from_samples(batch), mesh).to("cpu")
        with torch.no_grad():
            ce, w = m(planned, reduction="none")
        answer = generate(m, [batch[0]], mesh, max_new_tokens=NEW_TOKENS)[0]
        out["runs"][name] = {"ce": planned.plan.gather(ce[0]), "w": planned.plan.gather(w[0]), "answer": answer}
    ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vila_semantics"))
    return run_distributed(_save_and_compare, 1, root, timeout=240)[0]


def test_demo_model_round_trip_keeps_record_losses_and_answer(demo):
    from megatron_longvila.conversion import read_record
    from megatron_longvila.models.record import HF_FACTS_FILE, media_settings, read_model_record

    mine, back = read_model_record(demo["saved"]), read_record(demo["hf"])
    for f in RECORD_FIELDS:
        assert getattr(back, f) == getattr(mine, f), (f, getattr(mine, f), getattr(back, f))
    assert mine.tokenizer["kind"] == "bytes" and mine.vision["apply_post_layernorm"] is False
    assert {k: back.media.get(k) for k in mine.media} == mine.media
    assert media_settings(back) == media_settings(mine)
    top = json.load(open(os.path.join(demo["hf"], "config.json")))
    assert top["mm_vision_select_layer"] == -1 and top["mm_vision_select_feature"] == "cls_patch"
    assert json.loads(top["video_encoder"]) == {"_target_": "llava.model.encoders.BasicVideoEncoder",
                                                "end_tokens": None}  # no "\n" after frames, as trained
    assert os.path.isfile(os.path.join(demo["hf"], HF_FACTS_FILE))
    a, b = demo["runs"]["project"], demo["runs"]["hf"]
    assert int((a["w"] > 0).sum()) > 20 and torch.equal(a["w"], b["w"])
    assert torch.equal(a["ce"], b["ce"]), float((a["ce"] - b["ce"]).abs().max())
    assert len(a["answer"]) == NEW_TOKENS and a["answer"] == b["answer"]


# ------------------------------------------------------------------------------------------------------
# Refusals, without ranks
# ------------------------------------------------------------------------------------------------------

class _Random(Source):
    """Seeded random canonical tensors for `record` (rows: {key: {row: value}} set on top)."""

    format = "test"
    path = "random"

    def __init__(self, record, rows=None):
        self.record, self.rows = record, rows or {}

    def canonical(self, key):
        from megatron_longvila.conversion.mappings import canonical_specs

        shape = {s.key: s.shape for s in canonical_specs(self.record)}[key]
        g = torch.Generator().manual_seed(sum(map(ord, key)))
        t = torch.randn(shape, generator=g)
        for row, value in self.rows.get(key, {}).items():
            t[row] = value
        return t

    def dtype(self, key):
        return torch.float32

    def close(self):
        pass


def _export(source, target, dtype=None):
    from megatron_longvila.conversion.hf_common import write_hf_vila

    return write_hf_vila(source, str(target), dtype=dtype)


def test_exports_vila_would_run_differently_are_refused(tmp_path):
    from dataclasses import replace

    from megatron_longvila.errors import ConversionError
    from megatron_longvila.models.record import record_of

    rec = _demo_record()
    old = record_of(rec.llm_shape(), replace(rec.vision_config(), apply_post_layernorm=True),
                    real_vocab_size=rec.llm["vocab_size"], tokenizer=rec.tokenizer, media=rec.media)
    with pytest.raises(ConversionError, match=r"(?s)VILA would run this model differently.*post-LayerNorm"):
        _export(_Random(old), tmp_path / "old")
    assert not os.path.exists(tmp_path / "old")  # refused before anything is written
    eps = _demo_record()
    eps.projector = {"layernorm_epsilon": 1e-6}
    with pytest.raises(ConversionError, match=r"projector layernorm_epsilon 1e-06"):
        _export(_Random(eps), tmp_path / "eps")
    sep = _demo_record()
    sep.media = dict(sep.media, frame_separator=True)
    with pytest.raises(ConversionError, match=r"<frame_sep> token"):
        _export(_Random(sep), tmp_path / "sep")
    # The demo's model itself exports.
    _export(_Random(_demo_record()), tmp_path / "ok")
    assert os.path.isfile(tmp_path / "ok" / "config.json")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vila_semantics_release"))
    return make_vila(root, "qwen2_tied")


def _variant(src, dst, **top):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    cfg = json.load(open(path))
    for k, v in top.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    json.dump(cfg, open(path, "w"))
    return str(dst)


def test_select_keys_and_media_encoders_as_vila_reads_them(release, tmp_path):
    from megatron_longvila.conversion import read_record
    from megatron_longvila.errors import ConversionError

    d = _variant(release, tmp_path / "no_feature", mm_vision_select_feature=None)
    with pytest.raises(ConversionError, match=r"no mm_vision_select_feature: VILA's loader reads it as None"):
        read_record(d)
    d = _variant(release, tmp_path / "no_layer", mm_vision_select_layer=None)
    with pytest.raises(ConversionError, match=r"mm_vision_select_layer None"):
        read_record(d)
    tsp = json.dumps({"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[8, 1, 1]]})
    d = _variant(release, tmp_path / "tsp", video_encoder=tsp)
    with pytest.raises(ConversionError, match=r"video_encoder _target_ .*TSPVideoEncoder.*temporal pooling"):
        read_record(d)
    none = json.dumps({"_target_": "llava.model.encoders.BasicVideoEncoder", "end_tokens": None})
    d = _variant(release, tmp_path / "mixed", video_encoder=none)
    with pytest.raises(ConversionError, match=r"image_encoder end_tokens '\\n' and video_encoder end_tokens None"):
        read_record(d)
    d = _variant(release, tmp_path / "no_sep", video_encoder=none,
                 image_encoder=json.dumps({"_target_": "llava.model.encoders.BasicImageEncoder", "end_tokens": None}))
    assert read_record(d).media["frame_separator"] is False
    assert read_record(release).media["frame_separator"] == "\n"  # VILA's default encoders


def test_source_config_that_disagrees_with_the_model_is_refused(release, tmp_path):
    from megatron_longvila.conversion import read_record
    from megatron_longvila.errors import ConversionError

    rec = read_record(release)
    rec.media = dict(rec.media, frame_separator=False)  # trained without separators since the release
    with pytest.raises(ConversionError, match=r"configs would make VILA run another model:\n  VILA would put '\\n'"):
        _export(_Random(rec), tmp_path / "sep")
    rec = read_record(release)
    rec.vision_select_layer = -1
    rec.vision = dict(rec.vision)
    with pytest.raises(ConversionError, match=r"mm_vision_select_layer -2, the model feeds the projector hidden "
                                              r"state -1"):
        _export(_Random(rec), tmp_path / "layer")


def test_dropped_vocabulary_rows_must_be_padding(release, tmp_path):
    from megatron_longvila.conversion import read_record
    from megatron_longvila.conversion.mappings import LLM
    from megatron_longvila.errors import ConversionError

    rec = read_record(release)
    stored, used = int(rec.llm["vocab_size"]), int(rec.tokenizer["vocab_size"])
    assert used == stored + 3 and rec.padded_vocab_size > used  # VILA's three tokens after the stored rows
    emb = LLM + "embedding.word_embeddings.weight"
    media = int(rec.tokenizer["media_token_id"])
    # Zero rows for VILA's tokens (as a conversion pads them), random Megatron padding after them: exported.
    zero = {emb: {r: 0.0 for r in range(stored, used)}}
    _export(_Random(rec, zero), tmp_path / "ok")
    learned = {emb: {r: 0.0 for r in range(stored, used) if r != media}}
    with pytest.raises(ConversionError, match=rf"{emb}: rows {media} \(media_token_id\) hold values"):
        _export(_Random(rec, learned), tmp_path / "learned")


def test_model_trained_from_a_release_exports_the_release_files(release, tmp_path):
    # What training adds to a release's record (frames per video from --num-frames, VILA's own uniform sampling)
    # needs no facts file: the export's file list and configs are the release's.
    from megatron_longvila.conversion import read_record
    from megatron_longvila.models.record import HF_FACTS_FILE, media_settings, training_media

    from .fixtures import list_files

    rec = read_record(release)

    class Args:
        num_frames = 4

    rec.media = training_media(rec, media_settings(rec, Args()))
    out = tmp_path / "trained"
    emb = "language_model.model.embedding.word_embeddings.weight"  # VILA's three rows: zero, as converted
    _export(_Random(rec, {emb: {r: 0.0 for r in range(rec.llm["vocab_size"], rec.tokenizer["vocab_size"])}}), out,
            dtype=torch.bfloat16)  # the release's dtype: its configs are not retagged
    assert HF_FACTS_FILE not in list_files(out) and list_files(out) == list_files(release)
    for f in list_files(release):
        if not f.endswith(".safetensors"):
            assert (out / f).read_bytes() == open(os.path.join(release, f), "rb").read(), f
