"""LightGCN (He et al., SIGIR'20) on training purchases, trained with BPR."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from training.data import TrainingData
from training.models.base import Context, Recommender, TrainedModelConfig, bpr_loss, bpr_triplets
from training.models.graph import LightGCNEncoder, normalized_adjacency


class LightGCNConfig(TrainedModelConfig):
    """What each key means: ``lightgcn.yaml``."""

    dim: int = Field(gt=0)
    layers: int = Field(ge=0)
    reg: float = Field(ge=0)


class LightGCN(Recommender):
    name = "lightgcn"
    Config = LightGCNConfig
    cfg: LightGCNConfig

    def __init__(self, data: TrainingData, config: dict):
        super().__init__(data, config)
        self._purchases = data.purchases
        self.encoder = LightGCNEncoder(data.n_users, data.n_items, self.cfg.dim, self.cfg.layers)
        self._adj = normalized_adjacency(data.purchases)
        self._cache = None

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._adj = fn(self._adj)  # keep the graph on the parameters' device
        return out

    def batches(self, rng: np.random.Generator, batch_size: int):
        return bpr_triplets(self._purchases, rng, batch_size, self.device)

    def loss(self, batch):
        users, items = self.encoder(self._adj)
        u, p, n = batch["users"], batch["pos"], batch["neg"]
        ue, pe, ne = users[u], items[p], items[n]
        rank = bpr_loss((ue * pe).sum(1), (ue * ne).sum(1))
        ego_u, ego_p, ego_n = self.encoder.user(u), self.encoder.item(p), self.encoder.item(n)
        reg = self.cfg.reg * (ego_u.pow(2).sum() + ego_p.pow(2).sum() + ego_n.pow(2).sum()) / len(u)
        return {"loss": rank + reg, "bpr": rank, "reg": reg}

    def scores(self, context: Context) -> torch.Tensor:
        users = context.users.clamp(min=0)
        if self._cache is None or self.training:
            with torch.no_grad():
                self._cache = self.encoder(self._adj)
        user_emb, item_emb = self._cache
        return user_emb[users] @ item_emb.T
