"""Model FLOPs of a packed sequence (planning.flops) against a count by hand: mixed documents (causal attention per
document) and frames of two sizes (the encoder per frame, its attention over the frame's patches, the projector on
the 2x2-downsampled tokens), with everything training and with LongVILA's alignment preset (only the projector)."""

import pytest

from megatron_longvila.planning.flops import Trains, sequence_flops
from megatron_longvila.planning.memory import ModelShape

# The tiny LLM (Qwen2-like) and SigLIP-tiny, vocabulary padded to 128.
SHAPE = ModelShape(hidden=48, layers=2, heads=4, kv_heads=2, ffn=64, vocab=128, v_hidden=32, v_layers=2,
                   v_layers_run=2, v_heads=4, v_ffn=64, patch=14, image=56)
DOCS = [5, 3, 8]
FRAMES = [(56, 56), (56, 56), (42, 56)]

# By hand, forward FLOPs (2 per multiply-add):
# LLM per token: per layer QKV 48 x (4 + 2 x 2) x 12 = 4608, output projection 48 x 48 = 2304, SwiGLU 3 x 48 x 64 =
# 9216 -> 16128; 2 layers -> 32256; logits 48 x 128 = 6144; 2 x 38400 = 76800 per token, 16 tokens.
LLM_DENSE = 76800 * 16
# Causal attention: pairs 5*6/2 + 3*4/2 + 8*9/2 = 15 + 6 + 36 = 57; 4 FLOPs per pair per head dim (scores and
# values) x 4 heads x 12 dims x 2 layers.
LLM_ATTN = 4 * 57 * 4 * 12 * 2
# A 56 x 56 frame: 4 x 4 = 16 patches. Patch embedding 2 x 16 x (3 x 14 x 14) x 32 = 602112; per layer matmuls
# 2 x 16 x (4 x 32 x 32 + 2 x 32 x 64) = 262144 and attention 4 x 16 x 16 x 32 = 32768; 2 layers.
ENC_56 = 602112 + 2 * (262144 + 32768)
# A 42 x 56 frame: 3 x 4 = 12 patches: 2 x 12 x 588 x 32 = 451584; per layer 2 x 12 x 8192 = 196608 and
# 4 x 12 x 12 x 32 = 18432.
ENC_42 = 451584 + 2 * (196608 + 18432)
# Projector: 2 x 2 tokens per frame (3 x 4 patches pad up to 4 x 4 -> 2 x 2), each 2 x (4 x 32 x 48 + 48 x 48).
PROJ = 3 * 4 * 2 * (4 * 32 * 48 + 48 * 48)


def test_everything_training_matches_the_hand_count():
    got = sequence_flops(SHAPE, DOCS, FRAMES, Trains())
    # forward + input gradients + weight gradients = 3 forwards; attention's backward is 2 forwards.
    assert got["llm_dense"] == 3 * LLM_DENSE
    assert got["llm_attention"] == 3 * LLM_ATTN
    assert got["vision"] == 3 * (2 * ENC_56 + ENC_42)
    assert got["projector"] == 3 * PROJ
    assert got["total"] == 3 * (LLM_DENSE + LLM_ATTN + 2 * ENC_56 + ENC_42 + PROJ) == 3 * 4_718_976


def test_alignment_counts_the_backward_that_runs():
    """Only the projector trains: the gradient still flows back through the LLM (input gradients, no weight
    gradients), the projector gets weight gradients but passes none to the frozen encoder, which runs forward only."""
    got = sequence_flops(SHAPE, DOCS, FRAMES, Trains(llm=False, projector=True, vision=False))
    assert got["llm_dense"] == 2 * LLM_DENSE
    assert got["llm_attention"] == 3 * LLM_ATTN
    assert got["projector"] == 2 * PROJ
    assert got["vision"] == 2 * ENC_56 + ENC_42


def test_attention_follows_the_documents_not_the_sequence_length():
    one = sequence_flops(SHAPE, [16], [], Trains())["llm_attention"]
    split = sequence_flops(SHAPE, [8, 8], [], Trains())["llm_attention"]
    assert one == 3 * 4 * (16 * 17 // 2) * 4 * 12 * 2 and split == 3 * 4 * (2 * 36) * 4 * 12 * 2
    assert split < one


@pytest.mark.parametrize("frames", [[(56, 56)] * 4, [(112, 112)]])
def test_encoder_attention_grows_with_the_patches_of_a_frame(frames):
    """Four 56-px frames and one 112-px frame have the same patches (64); the big frame's attention is 4x."""
    got = sequence_flops(SHAPE, [10], frames, Trains())["vision"]
    matmuls = 3 * (64 * 2 * 588 * 32 + 2 * 2 * 64 * 8192)
    per_frame_patches = 16 if len(frames) == 4 else 64
    attention = 3 * 2 * 4 * per_frame_patches ** 2 * 32 * len(frames)
    assert got == matmuls + attention
