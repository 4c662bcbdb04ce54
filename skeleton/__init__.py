"""Skeleton: task-localized skeletons of a frozen language model.

Tune a soft prompt, score every FFN neuron by gradient attribution, cut the rest out of the network, re-tune
on what is left and export a standard, smaller checkpoint. Submodules: data, backbones, model, train,
attribution, selection (which units to keep), prune (cutting them out), macs, evaluate, benchmark, serve, specs
(what each stage is asked to do), stages (the pipeline as path-in / path-out functions), folder (the skeleton
folder type), skeleton_bert (the model class of checkpoints with per-layer widths or pruned heads).

Importing the package (or any submodule) changes nothing outside it: the "skeleton_bert" classes reach
transformers' Auto classes when a loader needs them, or when you call skeleton.skeleton_bert.register().
"""
__version__ = "0.1.0"
