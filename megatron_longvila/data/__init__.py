"""The video data pipeline (see docs/DATA.md).

manifest / energon -> dataset (probe, frames.select_frame_indices, conversation templates, tokenizer)
-> packing.pack_samples -> dataset.decode_media (video.decode_frames + image_processor) for this rank's frames.
"""
