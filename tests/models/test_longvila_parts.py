"""LongVILA's parts on one rank: projector shapes and layout, encoder resolution handling, the model's
CP=1 forward against a hand-built reference, input errors, freezing stages, the data pipeline's input."""

import pytest
import torch

from megatron_longvila.models.freezing import freeze_config, FreezeConfig, STAGES
from megatron_longvila.errors import FreezingError
from megatron_longvila.models.longvila import IGNORE_INDEX, MicroBatch, shift_targets
from megatron_longvila.models.projector import space_to_channel_2x2
from megatron_longvila.plan.frames import tokens_per_frame
from megatron_longvila.parallel.launch import run_distributed


def test_tokens_per_frame_matches_longvila():
    assert tokens_per_frame(384, 384, 14) == 196  # 27x27 patches, padded to 28x28, 2x2 -> 14x14
    assert tokens_per_frame(448, 448, 14) == 256  # 32x32 -> 16x16
    assert tokens_per_frame(42, 56, 14) == 4  # 3x4 -> 2x2


def test_space_to_channel_order_and_padding():
    x = torch.arange(3 * 3, dtype=torch.float32).view(1, 9, 1)  # a 3x3 grid of scalar features
    y = space_to_channel_2x2(x, 3, 3)
    assert y.shape == (1, 4, 4)
    # token (0,0) holds rows 0-1, cols 0-1 as (dy, dx): 0, 1, 3, 4; token (0,1) gets zero padding on the right
    assert y[0, 0].tolist() == [0, 1, 3, 4]
    assert y[0, 1].tolist() == [2, 0, 5, 0]
    assert y[0, 3].tolist() == [8, 0, 0, 0]


def test_shift_targets_stays_inside_documents():
    labels = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    w = torch.ones(7)
    t, tw = shift_targets(labels, w, [3, 4])
    assert t.tolist() == [2, 3, IGNORE_INDEX, 5, 6, 7, IGNORE_INDEX]
    assert tw.tolist() == [1, 1, 0, 1, 1, 1, 0]


def test_freeze_stages():
    assert list(STAGES) == ["align", "pretrain", "short_sft", "context_extension", "long_sft"]
    assert freeze_config("align") == FreezeConfig(train_vision=False, train_projector=True, train_llm=False)
    assert freeze_config("context_extension").train_llm and not freeze_config("context_extension").train_projector
    with pytest.raises(FreezingError, match="unknown training stage"):
        freeze_config("sft2")


def _one_rank(rank, world):
    from megatron_longvila.models.freezing import apply_freezing
    from megatron_longvila.errors import LongVILAInputError
    from megatron_longvila.models.longvila import LongVILASample, Media
    from megatron_longvila.models.vision import encode_frames
    from megatron_longvila.parallel.mesh import single_rank_mesh
    from megatron_longvila.parallel.sharding import plan_sequence

    from ._longvila_cases import MEDIA, build, micro_batch, setup_megatron

    setup_megatron()
    model = build()
    mesh = single_rank_mesh()
    out = {}

    # 1. CP=1 forward against a hand-built reference: encode every frame, project, write the rows at their
    #    positions into the text embeddings, run the GPT on the whole sequence, shifted weighted CE mean.
    mb = micro_batch("seven")
    loss = model(mb, mesh)
    with torch.no_grad():
        feats = encode_frames(model.vision_model, [f.pixels for f in mb.frames])
        emb = model.language_model.embed(mb.input_ids, mb.position_ids)[:, 0].clone()
        for f, x in zip(mb.frames, feats):
            g = int(round(x.shape[0] ** 0.5))
            emb[f.positions] = model.projector(x.unsqueeze(0), g, g)[0]
        t, w = shift_targets(mb.labels, mb.loss_weights, mb.seq_lens)
        ce = model.language_model(emb.unsqueeze(1), mb.position_ids, t, plan_sequence(mesh, mb.seq_lens))
        manual = (ce * w).sum() / w.sum()
    out["manual"] = abs(float(loss) - float(manual)) <= 1e-5 * abs(float(manual))
    with torch.no_grad():
        ce_tok, w_tok = model(mb, mesh, reduction="none")
    out["per_token"] = abs(float((ce_tok * w_tok).sum() / w.sum()) - float(loss)) <= 1e-5 * abs(float(loss))

    # 2. The pixels matter: a changed frame changes the loss.
    mb2 = micro_batch("seven")
    mb2.frames[3].pixels = mb2.frames[3].pixels + 1.0
    with torch.no_grad():
        out["pixels_matter"] = abs(float(model(mb2, mesh)) - float(loss)) > 1e-6

    # 3. Bad input gets clear errors.
    errors = {}
    bad = micro_batch("seven")
    bad.input_ids[bad.frames[0].positions[0]] = 11
    try:
        model(bad, mesh)
    except LongVILAInputError as e:
        errors["media_token"] = "media token" in str(e)
    bad = micro_batch("seven")
    bad.frames[0].positions = bad.frames[0].positions[:3]
    try:
        model(bad, mesh)
    except LongVILAInputError as e:
        errors["token_count"] = "token positions" in str(e)
    bad = micro_batch("seven")
    bad.frames[2].pixels = None
    try:
        model(bad, mesh)
    except LongVILAInputError as e:
        errors["missing_pixels"] = "pixels are missing" in str(e)
    try:
        MicroBatch.from_samples([LongVILASample(input_ids=torch.tensor([MEDIA, 1]), labels=torch.tensor([1, 1]),
                                                media=[Media(token_positions=torch.tensor([[0]]))])])
    except LongVILAInputError as e:
        errors["no_size"] = "frame_size" in str(e)
    out["errors"] = errors

    # 4. Context extension: LLM only on text; the visual parts get no gradient.
    apply_freezing(model, "context_extension")
    model.zero_grad(set_to_none=True)
    from ._longvila_cases import _sample

    text = MicroBatch.from_samples([_sample(torch.Generator().manual_seed(3), 0, 28, 1, 20, "text")])
    model(text, mesh).backward()
    out["ctx_ext"] = (all(p.grad is None for p in model.vision_model.parameters())
                      and all(p.grad is None for p in model.projector.parameters())
                      and all(p.grad is not None for p in model.language_model.parameters()))

    # 5. The data pipeline's PackedSequence feeds the model.
    from megatron_longvila.data.packing import concat_samples
    from megatron_longvila.data.sample import MediaItem, Sample

    ids = torch.tensor([20, 21] + [MEDIA] * 4 + [22] + [MEDIA] * 4 + [23, 24])
    s = Sample(input_ids=ids, labels=ids.clone(), media=[MediaItem(kind="video", path="v.mp4", frame_indices=[0, 5],
                                                                   frame_offsets=[2, 7], tokens_per_frame=4)])
    packed = concat_samples([s, s])
    px = torch.randn(2, 3, 56, 56)
    mbp = MicroBatch.from_packed(packed, [px, px])
    apply_freezing(model, "long_sft")
    out["packed"] = bool(torch.isfinite(model(mbp, mesh))) and len(mbp.frames) == 4 and \
        mbp.frames[3].positions.tolist() == [20, 21, 22, 23]
    try:
        MicroBatch.from_packed(packed, [px])
    except LongVILAInputError as e:
        out["packed_err"] = "media items" in str(e)
    return out


def _no_frames_rank(rank, world):
    from types import SimpleNamespace

    from ._longvila_cases import build, setup_megatron

    setup_megatron()
    model = build()
    model.zero_grad()
    rows = model.encode_local(SimpleNamespace(groups=[], device=torch.device("cpu"), row_order=None))
    rows.sum().backward()
    visual = [(n, p) for part in (model.vision_model, model.projector) for n, p in part.named_parameters()
              if p.requires_grad]
    return {"shape": tuple(rows.shape), "hidden": model.language_model.hidden_size, "trainable": len(visual),
            "with_grad": sum(p.grad is not None for _, p in visual),
            "all_zero": all(p.grad is None or not p.grad.any() for _, p in visual)}


def test_a_rank_without_frames_still_has_every_encoder_parameter_in_its_backward():
    """With Megatron's --overlap-grad-reduce a gradient bucket is reduced once all its parameters reported; a rank that
    encodes no frame must report its trainable encoder and projector parameters too (a zero gradient)."""
    out = run_distributed(_no_frames_rank, 1)[0]
    assert out["shape"] == (0, out["hidden"])
    assert out["trainable"] > 0 and out["with_grad"] == out["trainable"] and out["all_zero"]


def test_longvila_single_rank():
    out = run_distributed(_one_rank, 1)[0]
    assert out["manual"]
    assert out["per_token"]
    assert out["pixels_matter"]
    assert out["errors"] == {"media_token": True, "token_count": True, "missing_pixels": True, "no_size": True}
    assert out["ctx_ext"]
    assert out["packed"] and out["packed_err"]


def test_te_paths_fail_clearly_without_te():
    from megatron_longvila.errors import VisionConfigError
    from megatron_longvila.runtime.probes import te_available
    from megatron_longvila.models.vision import vit_layer_spec

    if te_available():
        pytest.skip("Transformer Engine is importable here; its path is exercised on GPU machines")
    with pytest.raises(VisionConfigError, match="Transformer Engine"):
        vit_layer_spec(use_te=True)


def test_padded_vocab_mask_is_written_in_place():
    """The output layer's padding columns (ids >= the real vocabulary) get -inf in the logits tensor the layer made,
    not in a masked copy, and the real columns' values and gradients are those of the unmasked layer."""
    from megatron_longvila.models.gpt import mask_padded_vocab

    class Output(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(12, 8))
            self.made = None

        def forward(self, x):
            self.made = x @ self.weight.t()
            return self.made, None

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.output_layer = Output()

    torch.manual_seed(0)
    model = mask_padded_vocab(Holder(), vocab_size=9)
    x = torch.randn(5, 8)
    logits, _ = model.output_layer(x)
    assert logits.data_ptr() == model.output_layer.made.data_ptr()  # the same storage: no second [s, V] tensor
    assert torch.isinf(logits[:, 9:]).all() and torch.isfinite(logits[:, :9]).all()
    ref_w = model.output_layer.weight.detach().clone().requires_grad_(True)
    ref = x @ ref_w.t()
    torch.testing.assert_close(logits[:, :9], ref[:, :9], rtol=0, atol=0)
    torch.log_softmax(logits, -1)[:, :9].sum().backward()
    torch.log_softmax(ref[:, :9], -1).sum().backward()
    g = model.output_layer.weight.grad
    assert not g[9:].any()  # padding rows learn nothing
    torch.testing.assert_close(g[:9], ref_w.grad[:9], rtol=1e-6, atol=1e-6)  # fp32, same ops
