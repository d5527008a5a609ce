"""The command-line tools, installed as console scripts (``pyproject.toml``'s ``[project.scripts]``).

    pfc-train           the trainer: ``torchrun --nproc_per_node=N -m pfc.train [RECIPE] [--FIELD V …]``
    pfc-pack            pack images into webdataset shards, verify or index a shard set
    pfc-plan            will my job fit? the capacity planner
    pfc-evaluate        verification of a trained backbone.pt
    pfc-compare-eval    verification results side by side
    pfc-export-onnx     backbone.pt → ONNX, checked with onnxruntime
    pfc-import-weights  insightface backbone weights → a pfc backbone.pt
    pfc-make-synthetic  procedural face-like identities to try pfc on
    pfc-embed           embeddings of a folder, an image list or shards (aligned by landmarks if given)

Each module's ``main(argv=None) -> int`` parses the command line and is the only place argv is
read; ``tools/*.py`` and ``launch/train.py`` in a clone are thin entries that call the same
``main``. Nothing here runs at import.
"""
