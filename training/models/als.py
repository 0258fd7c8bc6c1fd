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
from pydantic import Field
from threadpoolctl import threadpool_limits

from training.data import TrainingData
from training.models.base import BehaviorWeights, Context, ModelConfig, Recommender


class _ImplicitConfig(ModelConfig):
    factors: int = Field(gt=0)
    regularization: float = Field(ge=0)
    iterations: int = Field(gt=0)
    behavior_weights: BehaviorWeights


class ALSConfig(_ImplicitConfig):
    """What each key means: ``als.yaml``."""

    alpha: float = Field(ge=0)


class BPRConfig(_ImplicitConfig):
    """What each key means: ``bpr.yaml``."""

    learning_rate: float = Field(gt=0)


class _ImplicitMF(Recommender):
    trainable = False
    cfg: _ImplicitConfig

    def __init__(self, data: TrainingData, config: dict):
        super().__init__(data, config)
        self._data = data
        f = self.cfg.factors
        self.register_buffer("user_factors", torch.zeros(data.n_users, f))
        self.register_buffer("item_factors", torch.zeros(data.n_items, f))

    def confidence(self) -> sp.csr_matrix:
        out = sp.csr_matrix((self.n_users, self.n_items), dtype=np.float32)
        for behavior, w in self.cfg.behavior_weights.items():
            if behavior in self._data.matrices:
                out = out + w * self._data.matrices[behavior]
        return out.tocsr()

    def _estimator(self):
        raise NotImplementedError

    def _record(self, iteration: int, elapsed: float, *progress) -> None:
        raise NotImplementedError

    def fit(self) -> None:
        # implicit runs its own threads; BLAS threads on top of them oversubscribe the cores.
        self.fit_history: list[dict[str, float]] = []
        confidence = self.confidence()
        self._n_positives = confidence.nnz
        with threadpool_limits(1, "blas"):
            est = self._estimator()
            est.fit(confidence, show_progress=False, callback=self._record)
        uf, itf = np.asarray(est.user_factors), np.asarray(est.item_factors)
        self.user_factors = torch.from_numpy(np.ascontiguousarray(uf, np.float32))
        self.item_factors = torch.from_numpy(np.ascontiguousarray(itf, np.float32))

    def scores(self, context: Context) -> torch.Tensor:
        users = context.users.clamp(min=0).to(self.user_factors.device)
        return self.user_factors[users] @ self.item_factors.T


class ALS(_ImplicitMF):
    name = "als"
    Config = ALSConfig
    cfg: ALSConfig

    def _estimator(self):
        c = self.cfg
        return AlternatingLeastSquares(
            factors=c.factors,
            regularization=c.regularization,
            alpha=c.alpha,
            iterations=c.iterations,
            random_state=c.seed,
            calculate_training_loss=True,
        )

    def _record(self, iteration: int, elapsed: float, *progress) -> None:
        # implicit's ALS callback: (iteration, seconds, weighted squared loss)
        self.fit_history.append({"epoch": iteration + 1, "loss": float(progress[0]), "seconds": elapsed})


class BPR(_ImplicitMF):
    name = "bpr"
    Config = BPRConfig
    cfg: BPRConfig

    def _estimator(self):
        c = self.cfg
        return BayesianPersonalizedRanking(
            factors=c.factors,
            learning_rate=c.learning_rate,
            regularization=c.regularization,
            iterations=c.iterations,
            random_state=c.seed,
        )

    def _record(self, iteration: int, elapsed: float, *progress) -> None:
        # implicit's BPR callback: (iteration, seconds, correct, skipped) as counts over one sample per
        # positive; the share of sampled (positive, negative) pairs still ranked wrongly is the loss.
        correct, skipped = progress[0], progress[1]
        wrong = 1.0 - correct / max(self._n_positives - skipped, 1)
        self.fit_history.append({"epoch": iteration + 1, "loss": wrong, "seconds": elapsed})
