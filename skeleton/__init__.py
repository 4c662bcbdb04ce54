"""Skeleton: task-localized skeletons of a frozen language model.

Tune a soft prompt, score every FFN neuron by gradient attribution, cut the rest out of the network, re-tune
on what is left and export a standard, smaller checkpoint. Submodules: data, backbones, model, train,
attribution, prune, evaluate, benchmark, serve, stages (the pipeline as path-in / path-out functions),
skeleton_bert (the model class of checkpoints with per-layer widths or pruned heads).

`import skeleton` registers the "skeleton_bert" classes with transformers' AutoConfig / AutoModel, so a plain
`from_pretrained` loads such checkpoints; uniform FFN-only skeletons are stock checkpoints and need no import.
"""
from skeleton import skeleton_bert  # noqa: F401  (registers the model classes)

__version__ = "0.1.0"
