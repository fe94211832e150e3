"""MM-SP inference: sharded-KV prefill and decode, generation, teacher-forced scoring (see generate.py)."""

from .cache import InferenceState, ShardedKVCache
from .generate import AnswerScore, EmbeddingPrompt, InferenceError, Prefilled, generate, prefill, score

__all__ = ["generate", "score", "prefill", "EmbeddingPrompt", "AnswerScore", "Prefilled", "InferenceError",
           "ShardedKVCache", "InferenceState"]
