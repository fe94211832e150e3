"""Stage 2 of MM-SP: send projected visual embeddings from the rank that encoded them (stage 1) straight to
the ranks that own their token positions under the LLM's sequence plan, in one autograd-aware all-to-all.

Every embedding row crosses the network at most once (zero times when its encoder rank also owns its
token), so the bytes moved are the minimum for the given frame assignment; the backward is the same
all-to-all with the roles swapped and sends each gradient row back to the rank that encoded it.

The plan (plan.routing.build_routing_plan) is computed identically on every CP rank from metadata every rank has
(frame owners, frame token positions, the sequence plan), so no handshake is needed. A rank may send or receive
nothing; it still takes part in the collective, forward and backward, which is why `route` must be called on every
CP rank whenever any rank has visual tokens.

    route(local_embeds, rplan, group) -> received rows
    merge_visual(text_embeds, received, rplan) -> embeddings with the visual rows in place
"""

from __future__ import annotations

import torch

from ..errors import RoutingError
from ..plan.routing import RoutingPlan
from . import comm

__all__ = ["route", "merge_visual"]


def _on(index: torch.Tensor, device) -> torch.Tensor:
    # RoutingPlan.to(device) put the index there before the step; a host index meeting device activations is
    # the standalone API (tests, tools), which pays one copy here.
    return index if index.device == torch.device(device) else index.to(device)


def route(local_embeds: torch.Tensor, rplan: RoutingPlan, group) -> torch.Tensor:
    """Send this rank's visual embeddings to their token owners; return the rows this rank receives.

    Args:
        local_embeds: [local_rows, hidden], this rank's frames' projected embeddings in frame order (zero
            rows on a rank without frames; make it require grad when the backward must run).
        rplan: this rank's `RoutingPlan`.
        group: the CP process group (None only when the CP size is 1).

    Returns:
        [sum(recv_counts), hidden], row i belongs at local token `rplan.recv_local_index[i]`.
        Differentiable: the backward returns each gradient row to the rank that encoded it.
    """
    if local_embeds.dim() != 2 or local_embeds.shape[0] != rplan.local_rows:
        raise RoutingError(f"route: expected [{rplan.local_rows}, hidden] embeddings for this rank's frames, got "
                           f"{tuple(local_embeds.shape)}")
    hidden = local_embeds.shape[1]
    send = local_embeds.index_select(0, _on(rplan.send_rows, local_embeds.device))
    if rplan.cp_size == 1:
        return send
    out = comm.all_to_all_autograd(send, [c * hidden for c in rplan.recv_counts],
                                   [c * hidden for c in rplan.send_counts], group, kind="mmsp_route")
    return out.view(-1, hidden)


def merge_visual(text_embeds: torch.Tensor, received: torch.Tensor, rplan: RoutingPlan) -> torch.Tensor:
    """Place received visual rows into this rank's token embeddings, replacing the placeholder rows.

    Args:
        text_embeds: [s_local, b=1, hidden] (Megatron's layout) or [s_local, hidden].
        received: `route`'s output.
    """
    idx = _on(rplan.recv_local_index, text_embeds.device)
    if text_embeds.dim() == 3:
        if text_embeds.shape[1] != 1:
            raise RoutingError(f"merge_visual: MM-SP packs a micro-batch into one sequence (b=1), got b="
                               f"{text_embeds.shape[1]}")
        return merge_visual(text_embeds[:, 0], received, rplan).unsqueeze(1)
    return text_embeds.index_copy(0, idx, received.to(text_embeds.dtype))
