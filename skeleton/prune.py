"""Cut units out of a backbone's weights: FFN neurons (slice_ffn) and attention heads (slice_heads), in place, and
refit what the kept FFN neurons pass on so it carries what the removed ones added (reconstruct_ffn).

Which units to keep: skeleton.selection. Writing the cut model: skeleton.folder.SkeletonFolder.export.
"""
from __future__ import annotations

import torch
from torch import nn

from skeleton.backbones import family_of


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    index = index.to(linear.weight.device)  # indices are made on the CPU; the model may be on a GPU
    linear.weight = nn.Parameter(linear.weight.detach().index_select(dim, index).clone(), requires_grad=False)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach()[index].clone(), requires_grad=False)
        linear.out_features = len(index)
    else:
        linear.in_features = len(index)


def slice_ffn(backbone: nn.Module, keep: list[torch.Tensor]) -> nn.Module:
    """Physically remove every FFN neuron not in `keep` (in place); returns the backbone.

    Different widths per layer need a family with per-layer shapes (BERT); backbone.config follows the shapes."""
    family = family_of(backbone)
    blocks = family.ffn_blocks(backbone)
    if len(keep) != len(blocks) or any(len(k) == 0 for k in keep):
        raise ValueError(f"keep needs one non-empty index tensor per FFN layer ({len(blocks)}), got {len(keep)}")
    if len({len(k) for k in keep}) != 1 and not family.per_layer_shapes:
        raise NotImplementedError(f"per-layer FFN widths not supported for {type(family).__name__} yet; "
                                  "use the same kept width in every layer (allocation 'uniform')")
    for block, index in zip(blocks, keep):
        for up in block.up:
            _slice_linear(up, index, 0)
        _slice_linear(block.down, index, 1)
    family.sync_config(backbone)
    return backbone


@torch.no_grad()
def reconstruct_ffn(backbone: nn.Module, keep: list[torch.Tensor], moments: list[tuple[torch.Tensor, torch.Tensor]],
                    damping: float = 0.01) -> nn.Module:
    """Refit the kept neurons' down-projection columns so the FFN output keeps what the removed neurons added
    (in place, before slicing). Each layer's removed activations are predicted from the kept ones by least
    squares on calibration statistics (`attribution.activation_moments`), a_R ~ mu_R + C (a_S - mu_S) with
    C = Cov_RS Cov_SS^-1, and W_down[:, R] times that prediction is folded into W_down[:, S] and the down bias.
    A down projection without a bias (LLaMA) gets the regression through the origin, on raw second moments.
    `damping` (times the mean kept variance) is added to Cov_SS's diagonal: near-duplicate neurons stay stable."""
    for block, index, (mean, cov) in zip(family_of(backbone).ffn_blocks(backbone), keep, moments):
        down = block.down
        mean, cov, index = mean.to(down.weight.device), cov.to(down.weight.device), index.to(down.weight.device)
        removed = torch.ones(down.in_features, dtype=torch.bool, device=index.device)
        removed[index] = False
        if down.bias is None:  # no intercept to absorb the means: regress on E[a a^T]
            cov = cov + torch.outer(mean, mean)
        kept_cov = cov[index][:, index]
        ridge = damping * kept_cov.diagonal().mean()
        kept_cov = kept_cov + ridge * torch.eye(len(index), dtype=cov.dtype, device=cov.device)
        coef = torch.linalg.solve(kept_cov, cov[index][:, removed]).T  # (|R|, |S|)
        w_removed = down.weight[:, removed].double()
        down.weight[:, index] += (w_removed @ coef).to(down.weight.dtype)
        if down.bias is not None:
            down.bias += (w_removed @ (mean[removed] - coef @ mean[index])).to(down.bias.dtype)
    return backbone


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Indices of the rows (of q/k/v) or columns (of the output projection) that hold `heads`."""
    return (heads.long()[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


def _check_heads(blocks, heads: list[torch.Tensor]) -> None:
    if len(heads) != len(blocks) or any(len(h) == 0 for h in heads):
        raise ValueError(f"heads needs one non-empty index tensor per layer ({len(blocks)}): keep at least one "
                         f"head per layer; got {[len(h) for h in heads]}")


def slice_heads(backbone: nn.Module, heads: list[torch.Tensor]) -> nn.Module:
    """Physically remove every attention head not in `heads` (kept head indices per layer), in place: rows of the
    query/key/value projections, columns of the output projection; returns the backbone."""
    family = family_of(backbone)
    blocks = family.attention_blocks(backbone)
    _check_heads(blocks, heads)
    for block, index in zip(blocks, heads):
        columns = head_columns(index, block.head_dim)
        for linear in block.qkv:
            _slice_linear(linear, columns, 0)
        _slice_linear(block.out, columns, 1)
        family.set_num_heads(block, len(index))
    family.sync_config(backbone)
    return backbone
