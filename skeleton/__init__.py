"""Skeleton: task-localized skeletons of a frozen language model.

Tune a soft prompt, score every FFN neuron by gradient attribution, cut the rest out of the network, re-tune
on what is left and export a standard, smaller checkpoint. Submodules: data, backbones, model, train,
attribution, prune, evaluate, stages (the pipeline as path-in / path-out functions).
"""
__version__ = "0.1.0"
