"""DATM's learned soft labels (Guo et al., ICLR 2024; docs/method.md section 4.8): where they start.

A soft label is a row of logits per synthetic image; students and evaluation networks learn from its softmax
with the soft cross-entropy -sum_c p_c log q_c (`ast_core.functional`, `ast_core.evaluate`), and distillation
updates the logits by SGD like the images (`ast_core.matching.MatchingEngine`). DATM initialises them with the
experts' logits of the images: the mean over the experts whose last checkpoint classifies the image correctly.
DATM also picks the starting images among those correctly classified; here the images come from the row's
`init` (k-means picks, random real or noise) as for every row, and an image no expert classifies correctly
gets the mean over all experts, so every row starts from the same set with or without soft labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ast_core.matching import Trajectory
from ast_core.models import FlatModel


@torch.no_grad()
def expert_label_logits(flat_model: FlatModel, trajectories: Sequence[Trajectory], images: Tensor,
                        labels: Tensor) -> Tensor:
    """[images, classes] initial label logits: per image, the mean logits of the experts (last checkpoint) that
    classify it as `labels` says, or of all experts when none does."""
    if len(trajectories) == 0:
        raise ValueError("trajectories is empty: soft labels start from the experts' logits")
    device = images.device
    logits = torch.stack([flat_model(t.at(t.num_epochs).to(device), images) for t in trajectories])  # E x N x C
    correct = (logits.argmax(dim=2) == labels.to(device)).to(logits.dtype)                            # E x N
    weights = torch.where(correct.sum(dim=0, keepdim=True) > 0, correct, torch.ones_like(correct))
    return (weights.unsqueeze(2) * logits).sum(dim=0) / weights.sum(dim=0).unsqueeze(1)
