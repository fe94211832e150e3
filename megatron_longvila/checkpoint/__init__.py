"""Checkpoints on disk: where they live, what they hold, how a save is agreed and a load verified.

    layout        Megatron's iter_N folders and tracker, committed folders (`.old` mid re-save), safe_load
    integrity     the manifest (sizes, checksums) written at the commit and verified before a load; retention
    agreement     a save's success agreed by every rank at each phase (a failure anywhere commits nothing)
    resume        the iteration every rank resumes from, agreed at start-up and checked after the load
    data_state    the data position, one file per data-parallel replica, for both trainers
    distributed   save_checkpoint / load_checkpoint (megatron-core's dist_checkpointing, exact resume)
Conversion to and from Hugging Face VILA and NeMo 2 is the next layer (megatron_longvila.conversion).
"""
