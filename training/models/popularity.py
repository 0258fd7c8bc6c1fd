"""Popularity: every user gets the items bought most often in training."""

from __future__ import annotations

import numpy as np
import torch

from training.data import TrainingData
from training.models.base import BehaviorWeights, Context, ModelConfig, Recommender


class PopularityConfig(ModelConfig):
    """What each key means: ``popularity.yaml``."""

    behavior_weights: BehaviorWeights


class Popularity(Recommender):
    name = "popularity"
    trainable = False
    Config = PopularityConfig

    def __init__(self, data: TrainingData, config: dict):
        super().__init__(data, config)
        self._data = data
        self.register_buffer("item_score", torch.zeros(data.n_items))

    def fit(self) -> None:
        score = np.zeros(self.n_items)
        for behavior, w in self.cfg.behavior_weights.items():
            if behavior in self._data.matrices:
                score += w * np.asarray(self._data.matrices[behavior].sum(0)).ravel()
        self.item_score.copy_(torch.from_numpy(np.log1p(score)).float())

    def scores(self, context: Context) -> torch.Tensor:
        return self.item_score.to(context.users.device).expand(len(context), -1)

    def can_score(self, context: Context) -> torch.Tensor:
        # Everyone gets the same list: a user the training never saw is scored as well as any.
        return torch.ones(len(context), dtype=torch.bool, device=context.users.device)
