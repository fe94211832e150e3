"""The CPU runtime lets megatron-core 0.16.1 train a tiny GPT with TP, PP, DDP and its optimizer on gloo."""

import pytest
import torch

from megatron_longvila.parallel.launch import run_distributed


def _train_local_gpt(rank, world_size, tp, pp):
    from megatron_longvila.runtime.cpu import cpu_runtime_active, enable_cpu_runtime

    assert enable_cpu_runtime() is True
    assert enable_cpu_runtime() is True and cpu_runtime_active()  # idempotent

    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
                            pipeline_dtype=torch.float32, tensor_model_parallel_size=tp,
                            pipeline_model_parallel_size=pp, bias_activation_fusion=False,
                            bias_dropout_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
                            persist_layer_norm=False, apply_rope_fusion=False, hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=64,
                     max_sequence_length=16, pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage())
    model = DistributedDataParallel(cfg, DistributedDataParallelConfig(), model)
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func = model.no_sync
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1e-3), [model])
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))

    def step(it, model):
        out = model(tokens, torch.arange(16).expand(2, 16), None, labels=tokens)
        return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})

    losses = []
    for _ in range(2):
        opt.zero_grad()
        model.zero_grad_buffer()
        res = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None] * 2), model=[model],
                                          num_microbatches=2, seq_length=16, micro_batch_size=2)
        ok, grad_norm, _ = opt.step()
        assert ok and grad_norm > 0
        if res:
            losses.append(float(res[0]["loss"]))
    return losses


@pytest.mark.parametrize("tp,pp", [(2, 2)])
def test_cpu_runtime_trains_tp_pp(tp, pp):
    out = run_distributed(_train_local_gpt, tp * pp, tp, pp, timeout=120)
    last = [o for o in out if o]
    assert last and all(len(l) == 2 for l in last)
    assert last[0][1] < last[0][0]  # an optimizer step with clipped gradients lowered the loss


def test_cpu_runtime_refuses_with_cuda(monkeypatch):
    import megatron_longvila.runtime.cpu as cpu

    monkeypatch.setattr(cpu, "_ACTIVE", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    import megatron.core.pipeline_parallel.schedules as sched

    before = sched.torch
    assert cpu.enable_cpu_runtime() is False
    assert sched.torch is before and not cpu.cpu_runtime_active()
