"""Memory and time models of LongVILA training, and the mesh planner built on them.

    planning.memory    bytes per rank: parameters, gradients, optimizer state, activations per recompute/offload
                       setting, attention and ring buffers, stage-1 encoder and stage-2 routing buffers
    planning.timing    seconds per step: kernel throughput of a GPU profile and the project's counted bytes
    planning.mesh      the planner: every layout of a GPU count, ranked by predicted step time, with the reason
                       for each infeasible one
    planning.measure   what the models are checked against: saved-tensor bytes and the peak of live storage
"""
