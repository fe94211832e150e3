"""megatron_longvila: LongVILA's Multi-Modal Sequence Parallelism as a Megatron-Core plugin."""

from setuptools import find_packages, setup

setup(
    name="megatron_longvila",
    version="0.1.0",
    description="Long-context video-language training on Megatron-Core with Multi-Modal Sequence Parallelism",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_longvila", "megatron_longvila.*"]),
    install_requires=[
        # 0.16.1 is the newest megatron-core that supports Python 3.11.
        "megatron-core==0.16.1",
        "torch>=2.6",
        # megatron-core needs einops for hierarchical CP groups but does not declare it.
        "einops",
        "numpy",
        "sentencepiece",
        # Video decoding on CPU (H.264/HEVC) and image preprocessing.
        "av>=12",
        "pillow>=9.1",
        # megatron-core's distributed-checkpoint writer imports psutil without declaring it.
        "psutil",
        # Checkpoint conversion reads and writes Hugging Face weights only as safetensors (no pickles); V-NIAH caches
        # haystack embeddings in it.
        "safetensors",
        # V-NIAH's heatmap (tools/eval_vniah.py).
        "matplotlib",
        # Checkpoint manifests' checksums in hardware (~10 GB/s); zlib's crc32 (~2 GB/s) where it does not install.
        "crc32c",
    ],
    extras_require={
        # The GPU stack: used when importable, never required. NVIDIA apex is not on PyPI
        # (the PyPI package named "apex" is unrelated) and is therefore never listed.
        "gpu": ["transformer-engine[pytorch]", "nvidia-dali-cuda130"],
        # imageio-ffmpeg carries an ffmpeg binary (libx264, libvpx-vp9) to make real test videos; DALI's CPU
        # decoder is checked against PyAV in the tests (the wheel installs and imports without a GPU).
        # megatron.training (a Megatron-LM checkout on PYTHONPATH, see docs/TRAINING.md) imports these.
        "megatron-lm": ["regex", "pydantic"],
        # Megatron-Energon reads our webdataset shards (tools/make_manifest.py --energon): optional for training (it
        # brings 38 more packages), required by the tests (in "test" below: about 9 s more of set-up).
        "energon": ["megatron-energon==7.4.1"],
        # tokenizers loads Hugging Face tokenizer.json files (Qwen2-style).
        # transformers builds the tiny random Qwen2 / Llama / SigLIP references of the conversion tests.
        # import-linter checks the package's layer order (.importlinter; tests/test_layers.py runs it).
        # Every one is required: the test run stops at start-up when one is missing, and a test may skip only for a
        # GPU-only dependency or a Megatron-LM checkout (tests/_rules, README).
        "test": ["pytest", "pytest-timeout", "imageio-ffmpeg", "nvidia-dali-cuda130", "tokenizers", "transformers",
                 "safetensors", "import-linter==2.17", "megatron-energon==7.4.1"],
    },
)
