"""The five LongVILA training stages as recipes, in training order.

    RECIPES: dict name -> Recipe          align, pretrain, short_sft, context_extension, long_sft
    get_recipe(name) -> Recipe
    rope_base_for_length(seq_length)      LongVILA's RoPE base per context-extension target length
    recipe_rope(recipe, seq_length, given) -> (changes RoPE, recipe base, explicit base)   for both trainers
"""

from __future__ import annotations

from typing import Dict

from .base import CONTEXT_EXTENSION_ROPE_BASES, Recipe, recipe_rope, rope_base_for_length
from .stage1_align import RECIPE as ALIGN
from .stage2_pretrain import RECIPE as PRETRAIN
from .stage3_short_sft import RECIPE as SHORT_SFT
from .stage4_context_extension import RECIPE as CONTEXT_EXTENSION
from .stage5_long_sft import RECIPE as LONG_SFT

__all__ = ["RECIPES", "Recipe", "get_recipe", "rope_base_for_length", "recipe_rope", "CONTEXT_EXTENSION_ROPE_BASES"]

RECIPES: Dict[str, Recipe] = {r.name: r for r in (ALIGN, PRETRAIN, SHORT_SFT, CONTEXT_EXTENSION, LONG_SFT)}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"--recipe {name!r}: choose one of {list(RECIPES)}")
    return RECIPES[name]
