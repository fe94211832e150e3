"""The batch layer: what a step trains on, from samples to this rank's planned micro-batch on the device.

    sample             samples, media, the packed MicroBatch, next-token targets
    microbatch         VisualSpec, plan_microbatch -> PlannedMicroBatch (plans, shards, weights, device copies)
    packed_seq_params  MMSPPackedSeqParams: how the plan reaches MM-SP attention inside Megatron's layers
    gpt                the GPT-only path: shard_batch and its Megatron loss function
"""
