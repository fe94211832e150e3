"""The reference a converted model must reproduce: VILA composed from transformers' own modules (Qwen2 / Llama
causal LM, SigLIP vision model) and VILA's projector formula, run in the parent process (fp32, eager attention).

VILA's projector, as its code reads (`DownSampleBlock` + `nn.Sequential(LayerNorm, Linear, GELU, Linear)`): patch
features [n, N, C] on a square grid; a zero row appended at the bottom and a zero column at the right when the
side is odd; pairs of columns become channels, then pairs of rows; VILA's current code transposes the token grid
back (row-major), its 2024 code did not (column-major). Then LayerNorm(4C, eps 1e-5), Linear, exact GELU, Linear.
The feature is SigLIP's hidden_states[-2] (no post-LayerNorm, no head); each frame's tokens replace its
placeholder embeddings in the LLM's input.
"""

from __future__ import annotations

import os
from typing import List

import torch
import torch.nn.functional as F

from megatron_longvila.models.longvila import IGNORE_INDEX, LongVILASample, Media, MicroBatch


def vila_downsample(x: torch.Tensor, order: str) -> torch.Tensor:
    n, tokens, c = x.shape
    h = w = int(round(tokens ** 0.5))
    x = x.reshape(n, h, w, c)
    if h % 2:
        x = torch.cat([x, x.new_zeros(n, 1, w, c)], dim=1)
        h += 1
    if w % 2:
        x = torch.cat([x, x.new_zeros(n, h, 1, c)], dim=2)
        w += 1
    x = x.reshape(n, h, w // 2, 2 * c).permute(0, 2, 1, 3).reshape(n, w // 2, h // 2, 4 * c)
    if order == "row_major":
        x = x.permute(0, 2, 1, 3)
    return x.reshape(n, -1, 4 * c)


class VilaReference:
    """VILA from transformers' modules; `load_info` holds transformers' missing/unexpected keys per sub-folder."""

    def __init__(self, folder: str, order: str):
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, SiglipVisionModel

        self.order = order
        self.llm, info_llm = AutoModelForCausalLM.from_pretrained(
            os.path.join(folder, "llm"), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
        self.vision, info_vis = SiglipVisionModel.from_pretrained(
            os.path.join(folder, "vision_tower"), dtype=torch.float32, attn_implementation="eager",
            output_loading_info=True)
        self.load_info = {"llm": info_llm, "vision_tower": info_vis}
        sd = load_file(os.path.join(folder, "mm_projector", "model.safetensors"))
        c4, h = sd["layers.2.weight"].shape[1], sd["layers.2.weight"].shape[0]
        self.proj = torch.nn.Sequential(torch.nn.Identity(), torch.nn.LayerNorm(c4, eps=1e-5),
                                        torch.nn.Linear(c4, h), torch.nn.GELU(), torch.nn.Linear(h, h))
        self.proj.load_state_dict({k[len("layers."):]: v.float() for k, v in sd.items()}, strict=True)
        self.rows = self.llm.get_input_embeddings().weight.shape[0]
        for m in (self.llm, self.vision, self.proj):
            m.eval()

    @torch.no_grad()
    def frame_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        feats = self.vision(pixel_values=frames.float(), output_hidden_states=True).hidden_states[-2]
        return self.proj(vila_downsample(feats, self.order))

    @torch.no_grad()
    def token_losses(self, samples: List[LongVILASample]) -> torch.Tensor:
        """Per-token next-token CE of the packed samples, as LongVILAModel's reduction="none" aligns them (position
        t learns labels[t + 1] of its document; the last position of a document 0)."""
        out = []
        for s in samples:
            ids = s.input_ids.clone()
            ids[ids >= self.rows] = 0  # placeholders: their embeddings are replaced below
            emb = self.llm.get_input_embeddings()(ids).clone()
            for m in s.media:
                rows = self.frame_tokens(m.frames)
                for k in range(rows.shape[0]):
                    emb[m.token_positions[k]] = rows[k]
            logits = self.llm(inputs_embeds=emb[None], position_ids=torch.arange(len(ids))[None]).logits[0]
            target = s.labels[1:]
            ce = F.cross_entropy(logits[:-1].float(), target.clamp(min=0), reduction="none")
            ce = torch.where(target == IGNORE_INDEX, torch.zeros_like(ce), ce)
            out.append(torch.cat([ce, ce.new_zeros(1)]))
        return torch.cat(out)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm(input_ids=ids[None], position_ids=torch.arange(len(ids))[None]).logits[0]


def samples(record, seed: int) -> List[LongVILASample]:
    """A 3-frame video with VILA's "\\n" after each frame, an image, and a text-only sample (every real token
    learned), at the encoder's native size, with the record's media token."""
    g = torch.Generator().manual_seed(seed)
    v = record.vision_config()
    size = v.image_size
    grid = size // v.patch_size
    tpf = ((grid + 1) // 2) ** 2
    media_id = int(record.tokenizer["media_token_id"])
    nl = record.tokenizer.get("frame_separator_id")
    rows = int(record.llm["vocab_size"])

    def text(n):
        return torch.randint(0, rows, (n,), generator=g).tolist()

    out = []
    for frames, n_text in ((3, 7), (1, 5), (0, 9)):
        ids = text(3)
        pos = []
        for _ in range(frames):
            pos.append(list(range(len(ids), len(ids) + tpf)))
            ids += [media_id] * tpf + ([int(nl)] if nl is not None else [])
        ids += text(n_text)
        ids_t = torch.tensor(ids)
        labels = ids_t.clone()
        labels[ids_t == media_id] = IGNORE_INDEX
        media = [Media(token_positions=torch.tensor(pos), frames=torch.randn(frames, 3, size, size, generator=g),
                       kind="video" if frames > 1 else "image")] if frames else []
        out.append(LongVILASample(input_ids=ids_t, labels=labels, media=media))
    return out


def micro_batch(record, seed: int) -> MicroBatch:
    return MicroBatch.from_samples(samples(record, seed))
