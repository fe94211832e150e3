"""Megatron's model and kernel flags reach LongVILA's configs with Megatron's meaning, or are refused with the reason:
a table of flags, each resolved by the dry run in this one process (no launcher, no device, no Transformer Engine),
for a launch on GPUs unless the row says --cpu."""

import json
import os
import subprocess
import sys

import pytest

from megatron_longvila.errors import ArgumentError, MMSPConfigError
from megatron_longvila.training.dry_run import dry_run

from .example_script import SCRIPT, load_example_script

TINY = ["--recipe", "short_sft", "--vision-encoder", "siglip_tiny", "--llm", "tiny", "--seq-length", "256",
        "--global-batch-size", "2", "--train-iters", "10", "--context-parallel-size", "2",
        "--hierarchical-context-parallel-sizes", "2", "1"]
QWEN = ["--recipe", "short_sft", "--llm", "qwen2_7b", "--seq-length", "4096", "--global-batch-size", "8",
        "--train-iters", "10", "--bf16"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    path = tmp_path_factory.mktemp("flags") / "m.jsonl"
    path.write_text(json.dumps({"id": "a", "video": "v.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A square moves."}]}) + "\n")
    return str(path)


def run(manifest, base, *flags, world=2):
    return dry_run(base + ["--data-path", manifest, *flags], load_example_script().extra_args_provider,
                   world_size=world)


TE = ["--transformer-impl", "transformer_engine", "--bf16"]

# (flags, check(report)) for flags that are honoured; every row passes its own flags only.
HONOURED = [
    (["--transformer-impl", "local"],
     lambda r: r["llm_config"]["transformer_impl"] == "local"
     and r["spec"]["llm_layer"]["self_attention.linear_qkv"].endswith("ColumnParallelLinear")
     and r["sources"]["llm"]["transformer_impl"] == "flag --transformer-impl"),
    (TE, lambda r: all(r[f"{p}_config"]["transformer_impl"] == "transformer_engine"
                       for p in ("llm", "vision", "projector"))
     and r["spec"]["llm_layer"]["self_attention.linear_qkv"].endswith("TELayerNormColumnParallelLinear")
     and r["spec"]["vision_layer"]["self_attention.core_attention"].endswith("TEDotProductAttention")
     and r["spec"]["projector"]["mlp.linear_fc1"].endswith("TEColumnParallelLinear")
     # Fusions on by default only with TE on CUDA (Megatron's defaults there).
     and r["llm_config"]["apply_rope_fusion"] and r["llm_config"]["gradient_accumulation_fusion"]),
    (["--attention-backend", "flash"], lambda r: r["attention"]["kernel"] == "torch_cuda"
     and r["llm_config"]["attention_backend"] == "flash"),
    (["--attention-backend", "unfused"], lambda r: r["attention"]["kernel"] == "math"),
    (TE + ["--fp8-format", "hybrid"], lambda r: r["llm_config"]["fp8"] == "hybrid"
     and r["vision_config"]["fp8"] is None and r["sources"]["llm"]["fp8"] == "flag --fp8-format"),
    (TE + ["--fp8-format", "e4m3", "--fp8-recipe", "delayed", "--fp8-amax-history-len", "16"],
     lambda r: r["llm_config"]["fp8_recipe"] == "delayed" and r["llm_config"]["fp8_amax_history_len"] == 16),
    (TE + ["--fp8-format", "hybrid", "--fp8-dot-product-attention"],
     lambda r: r["llm_config"]["fp8_dot_product_attention"] and r["attention"]["kernel"] == "te_fp8"),
    (TE + ["--no-masked-softmax-fusion"], lambda r: r["llm_config"]["masked_softmax_fusion"] is False),
    (TE + ["--no-bias-swiglu-fusion"], lambda r: r["llm_config"]["bias_activation_fusion"] is False),
    (TE + ["--no-bias-dropout-fusion"], lambda r: all(r[f"{p}_config"]["bias_dropout_fusion"] is False
                                                      for p in ("llm", "vision", "projector"))),
    (TE + ["--no-rope-fusion"], lambda r: r["llm_config"]["apply_rope_fusion"] is False
     and r["sources"]["llm"]["apply_rope_fusion"] == "flag --no-rope-fusion"),
    (TE + ["--no-gradient-accumulation-fusion"], lambda r: r["llm_config"]["gradient_accumulation_fusion"] is False),
    (TE + ["--no-persist-layer-norm"], lambda r: r["llm_config"]["persist_layer_norm"] is False),
    (TE + ["--cross-entropy-loss-fusion"], lambda r: r["llm_config"]["cross_entropy_loss_fusion"] is True),
    (["--init-method-std", "0.01"], lambda r: all(r[f"{p}_config"]["init_method_std"] == 0.01
                                                  for p in ("llm", "vision", "projector"))),
    (["--attention-dropout", "0"], lambda r: r["llm_config"]["attention_dropout"] == 0.0
     and r["sources"]["llm"]["attention_dropout"] == "flag --attention-dropout"),
    (["--hidden-dropout", "0.05"], lambda r: r["llm_config"]["hidden_dropout"] == 0.05
     and r["vision_config"]["hidden_dropout"] == 0.0),
    (["--overlap-grad-reduce"], lambda r: r["ddp"]["overlap_grad_reduce"] is True),
    (["--use-distributed-optimizer", "--overlap-param-gather"], lambda r: r["ddp"]["overlap_param_gather"] is True),
    (["--num-layers", "2", "--hidden-size", "48", "--num-attention-heads", "4", "--group-query-attention",
      "--num-query-groups", "2", "--swiglu", "--disable-bias-linear", "--add-qkv-bias", "--normalization", "RMSNorm"],
     lambda r: r["llm_config"]["num_layers"] == 2),
    (["--max-position-embeddings", "1024"], lambda r: True),
    (["--cp-comm-type", "a2a+p2p"], lambda r: r["llm_config"]["cp_comm_type"] == "a2a+p2p"),
]

# (flags, the error's words) for flags that are refused.
REFUSED = [
    (["--transformer-impl", "local", "--bf16", "--fp8-format", "hybrid"], "needs Transformer Engine on CUDA"),
    (["--cpu", "--fp8-format", "e4m3"], "needs Transformer Engine on CUDA"),
    (["--transformer-impl", "transformer_engine", "--fp8-format", "hybrid"], "add --bf16"),
    (TE + ["--fp8-param-gather"], "--fp8-param-gather"),
    (["--fp8-recipe", "delayed"], "--fp8-recipe without --fp8-format"),
    (["--fp8-dot-product-attention"], "needs --fp8-format"),
    (["--transformer-impl", "local", "--apply-rope-fusion"], "needs Transformer Engine on CUDA"),
    (["--transformer-impl", "local", "--cross-entropy-loss-fusion"], "needs Transformer Engine on CUDA"),
    (["--attention-backend", "fused", "--transformer-impl", "local"], "fused attention needs"),
    (["--attention-dropout", "0.1"], "MM-SP attention has no dropout"),
    (["--overlap-param-gather"], "needs --use-distributed-optimizer"),
    (["--num-layers", "12"], "--num-layers 12 contradicts the model (--llm tiny: 2)"),
    (["--hidden-size", "64"], "--hidden-size 64 contradicts the model (--llm tiny: 48)"),
    (["--normalization", "LayerNorm"], "--normalization LayerNorm contradicts the model"),
    (["--max-position-embeddings", "100"], "below --seq-length 256"),
    (["--cpu", "--attention-backend", "flash"], "needs CUDA"),
    (["--cpu", "--transformer-impl", "transformer_engine"], "Transformer Engine needs CUDA"),
]


def test_honoured_flags_reach_the_configs(manifest):
    failed = []
    for flags, check in HONOURED:
        report = run(manifest, TINY, *flags)
        if not check(report):
            failed.append(flags)
    assert failed == []
    assert len({f for flags, _ in HONOURED for f in flags if f.startswith("--")} | {
        f for flags, _ in REFUSED for f in flags if f.startswith("--")}) >= 15


def test_refused_flags_say_why(manifest):
    for flags, words in REFUSED:
        with pytest.raises((ArgumentError, MMSPConfigError)) as e:
            run(manifest, TINY, *flags)
        assert words in str(e.value), (flags, str(e.value))


def test_flags_not_given_take_the_models_and_the_recipes_values(manifest):
    r = run(manifest, TINY)
    src = r["sources"]["llm"]
    assert r["llm_config"]["hidden_dropout"] == 0.0 and src["hidden_dropout"].startswith("recipe")
    assert r["llm_config"]["attention_dropout"] == 0.0 and src["attention_dropout"].startswith("recipe")
    assert r["llm_config"]["layernorm_epsilon"] == 1e-6 and src["layernorm_epsilon"] == "model: --llm tiny"
    assert r["llm_config"]["init_method_std"] == 0.02 and src["init_method_std"].startswith("default")
    # On a GPU target without --transformer-impl, TE is taken where it imports (said in the notes).
    assert r["llm_config"]["transformer_impl"] == "transformer_engine" and any("not checked" in n for n in r["notes"])
    cpu = run(manifest, TINY, "--cpu")
    assert cpu["llm_config"]["transformer_impl"] == "local" and not cpu["llm_config"]["apply_rope_fusion"]
    assert any("--transformer-impl local" in n for n in cpu["notes"])


def test_shape_flags_agree_with_a_registered_7b(manifest):
    r = run(manifest, QWEN, "--untie-embeddings-and-output-weights", "--add-qkv-bias", "--num-query-groups", "4",
            world=8)
    assert r["llm_config"]["num_layers"] == 28
    with pytest.raises(ArgumentError, match=r"--add-qkv-bias given contradicts the model \(--llm llama3_8b: False\)"):
        run(manifest, QWEN[:3] + ["llama3_8b"] + QWEN[4:], "--add-qkv-bias", world=8)


def test_no_transformer_engine_stops_a_real_launch_naming_it():
    """Where TE does not import (this machine), a real launch's resolution refuses it naming Transformer Engine."""
    from megatron_longvila.models.registry import LLMS
    from megatron_longvila.runtime.probes import te_available
    from megatron_longvila.training.model_flags import resolve_model

    class Args:
        transformer_impl = "transformer_engine"
        bf16 = True

    if te_available():
        pytest.skip("Transformer Engine imports here")
    with pytest.raises(ArgumentError, match="Transformer Engine"):
        resolve_model(Args(), LLMS["tiny"], given={"transformer_impl": "transformer_engine"}, cuda=True, te=False,
                      shape_source="--llm tiny")


def test_training_without_cuda_and_without_cpu_names_cpu(manifest, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is visible here")
    r = subprocess.run([sys.executable, SCRIPT, *TINY, "--data-path", manifest, "--transformer-impl",
                        "transformer_engine"], capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                       env=dict(os.environ, RANK="0", WORLD_SIZE="1"))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "give --cpu" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    one_rank = ["--context-parallel-size", "1", "--hierarchical-context-parallel-sizes", "1", "1"]
    r = subprocess.run([sys.executable, SCRIPT, *TINY, *one_rank, "--data-path", manifest, "--cpu",
                        "--transformer-impl", "transformer_engine"], capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                       env=dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29581"))
    assert r.returncode == 2 and "Transformer Engine" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
