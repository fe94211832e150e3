"""Model FLOPs of the sequences a step actually trained: what TFLOP/s and MFU count.

    Trains(llm, projector, vision)                         which parts learn (their backward work)
    sequence_flops(shape, doc_lens, frame_sizes, trains) -> dict   one packed sequence's training FLOPs, by part

The count follows the sequence, not a typical one: causal attention per document from its actual length (the
pairs a causal document holds, n (n + 1) / 2), and the encoder per frame from its own patch grid, with the encoder's
attention (each frame's patches attend to one another). Matmuls count 2 FLOPs per multiply-add. The backward is
counted as the work that runs: the gradient with respect to the inputs (one forward's worth) wherever a gradient
has to flow through a part (it trains, or a part before it does), the gradient with respect to the weights (one
more) where the part trains; attention's backward is twice its forward. Recompute is not counted (model FLOPs, not
hardware FLOPs), nor norms, activations and RoPE (a few FLOPs per element).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

from ..plan.frames import tokens_per_frame
from .memory import ModelShape

__all__ = ["Trains", "sequence_flops"]


@dataclass(frozen=True)
class Trains:
    """Which parts of LongVILA learn in a run (models.freezing's presets)."""

    llm: bool = True
    """The LLM's parameters train."""
    projector: bool = True
    """The projector's parameters train."""
    vision: bool = True
    """The vision encoder's parameters train."""


def _llm_dense_per_token(shape: ModelShape) -> float:
    """Forward FLOPs of one token through the LLM's matmuls: per layer QKV (GQA), the output projection and SwiGLU's
    three matrices; then the output layer's logits."""
    h, d = shape.hidden, shape.head_dim
    qkv = h * (shape.heads + 2 * shape.kv_heads) * d
    per_layer = qkv + h * h + 3 * h * shape.ffn
    return 2.0 * (shape.layers * per_layer + h * shape.vocab)


def _llm_attention(shape: ModelShape, doc_lens: Sequence[int]) -> float:
    """Forward FLOPs of causal attention: per document of n tokens, n (n + 1) / 2 query-key pairs, each 2 x head_dim
    for the scores and 2 x head_dim for the weighted values, per query head and layer."""
    pairs = sum(n * (n + 1) // 2 for n in doc_lens)
    return 4.0 * pairs * shape.heads * shape.head_dim * shape.layers


def _frame(shape: ModelShape, height: int, width: int) -> Tuple[float, float]:
    """(encoder, projector) forward FLOPs of one frame: the patch embedding, the layers the encoder runs (matmuls and
    full attention over the frame's patches), and the projector on the 2x2-downsampled tokens."""
    p = (height // shape.patch) * (width // shape.patch)
    vh, vf = shape.v_hidden, shape.v_ffn
    embed = 2.0 * p * 3 * shape.patch ** 2 * vh
    layer = 2.0 * p * (4 * vh * vh + 2 * vh * vf) + 4.0 * p * p * vh
    tokens = tokens_per_frame(height, width, shape.patch)
    projector = 2.0 * tokens * (4 * vh * shape.hidden + shape.hidden * shape.hidden)
    return embed + shape.v_layers_run * layer, projector


def sequence_flops(shape: ModelShape, doc_lens: Sequence[int], frame_sizes: Sequence[Tuple[int, int]] = (),
                   trains: Trains = Trains()) -> Dict[str, float]:
    """Training FLOPs (forward and backward) of one packed sequence: `doc_lens` its documents' token counts (filler
    excluded), `frame_sizes` the (height, width) of each of its frames. Returns the parts and their "total"."""
    tokens = sum(doc_lens)
    enc = proj = 0.0
    for h, w in frame_sizes:
        e, pj = _frame(shape, h, w)
        enc += e
        proj += pj
    # Backward multipliers: input gradients where a gradient flows through, weight gradients where the part trains.
    # A trainable encoder or projector takes part in every backward (models.longvila's zero-weight term when a
    # sequence has no frame), so the gradient then flows through the LLM even when it is frozen.
    llm_dgrad = trains.llm or trains.projector or trains.vision
    proj_dgrad = trains.vision
    parts = {
        "llm_dense": _llm_dense_per_token(shape) * tokens * (1 + llm_dgrad + trains.llm),
        "llm_attention": _llm_attention(shape, doc_lens) * (1 + 2 * llm_dgrad),
        "projector": proj * (1 + proj_dgrad + trains.projector),
        "vision": enc * (1 + 2 * trains.vision),
    }
    parts["total"] = sum(parts.values())
    return parts
