"""Matrix factorisation baselines from the ``implicit`` library: ALS and BPR.

The user x item confidence matrix is the weighted sum of the configured behaviours' 0/1 matrices
(purchases only by default; ``*_multi`` configs weigh every behaviour). Factors are kept as buffers,
so the state dict round-trips like every other model.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from implicit.cpu.als import AlternatingLeastSquares
from implicit.cpu.bpr import BayesianPersonalizedRanking
from threadpoolctl import threadpool_limits

from training.data import TrainingData
from training.models.base import Recommender


class _ImplicitMF(Recommender):
    trainable = False

    def __init__(self, data: TrainingData, config: dict):
        super().__init__(data, config)
        self._data = data
        f = int(config["factors"])
        self.register_buffer("user_factors", torch.zeros(data.n_users, f))
        self.register_buffer("item_factors", torch.zeros(data.n_items, f))

    def confidence(self) -> sp.csr_matrix:
        out = sp.csr_matrix((self.n_users, self.n_items), dtype=np.float32)
        for behavior, w in self.config["behavior_weights"].items():
            if behavior in self._data.matrices:
                out = out + float(w) * self._data.matrices[behavior]
        return out.tocsr()

    def _estimator(self):
        raise NotImplementedError

    def fit(self) -> None:
        # implicit runs its own threads; BLAS threads on top of them oversubscribe the cores.
        with threadpool_limits(1, "blas"):
            est = self._estimator()
            est.fit(self.confidence(), show_progress=False)
        uf, itf = np.asarray(est.user_factors), np.asarray(est.item_factors)
        self.user_factors = torch.from_numpy(np.ascontiguousarray(uf, np.float32))
        self.item_factors = torch.from_numpy(np.ascontiguousarray(itf, np.float32))

    def scores(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_factors[users.to(self.user_factors.device)] @ self.item_factors.T


class ALS(_ImplicitMF):
    name = "als"

    def _estimator(self):
        c = self.config
        return AlternatingLeastSquares(
            factors=int(c["factors"]),
            regularization=float(c["regularization"]),
            alpha=float(c["alpha"]),
            iterations=int(c["iterations"]),
            random_state=int(c.get("seed", 0)),
        )


class BPR(_ImplicitMF):
    name = "bpr"

    def _estimator(self):
        c = self.config
        return BayesianPersonalizedRanking(
            factors=int(c["factors"]),
            learning_rate=float(c["learning_rate"]),
            regularization=float(c["regularization"]),
            iterations=int(c["iterations"]),
            random_state=int(c.get("seed", 0)),
        )
