"""MM-SP inference: sharded-KV prefill and decode, generation, teacher-forced scoring (see generate.py)."""

from .cache import InferenceState, ShardedKVCache
from .generate import AnswerScore, EmbeddingPrompt, generate, prefill, Prefilled, score
from ..errors import InferenceError

__all__ = ["generate", "score", "prefill", "EmbeddingPrompt", "AnswerScore", "Prefilled", "InferenceError",
           "ShardedKVCache", "InferenceState"]
