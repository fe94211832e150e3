"""Plans: pure functions of lengths and sizes (no process groups, no collectives, no model).

    sequence   the zigzag layout of a packed sequence over a U x R mesh (which tokens each CP rank holds)
    segments   varlen segment boundaries of one attention block
    ring       the blocks each zigzag ring step computes
    ulysses    how heads spread over a Ulysses group; the pad-free rows of a received ring buffer
    frames     stage 1: which CP rank encodes each frame; patch and token geometry of a frame
    routing    stage 2: which visual rows each CP rank sends and receives
"""
