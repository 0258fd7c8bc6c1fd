"""The model contract every recommender implements.

The trainer, the evaluator, the scorer and MLflow only ever call these methods, so none of them
special-cases a model:

- ``batches(rng, batch_size)``: training examples of one epoch (gradient-trained models);
- ``loss(batch)``: the training objective for a batch, as ``{"loss": total, <part>: value, ...}``;
- ``fit()``: closed-form / external training for models that are not trained by gradient steps
  (``trainable = False``: popularity, the ``implicit`` models);
- ``scores(context)``: (B, n_items) scores of a batch of users against every item, from the users'
  ``Context``: who they are to the model and what they did as of the scoring date;
- ``can_score(context)``: (B,) which of those rows the scores mean anything for (by default the
  users the model was trained on; a model that scores from context alone says True for all);
- ``explain(context, rows, items)``: per (row, item) the item type (visited / unvisited, from the
  context) and the expert or gate weights behind its score.

A model never reads who visited what from the tables it was trained on when it scores: the
evaluator hands it the context of its evaluation data (``Context.of_training``), the nightly scorer
the context of the scoring date (``serving_context``, see ``training.pyfunc``). Training (losses,
negatives) uses the training tables as before.

Models are found by name (``training.models.build_model``): ``training/models/<name>.py`` defines a
subclass with ``name = "<name>"`` and ``training/models/<name>.yaml`` its commented defaults. The
subclass's ``Config`` (a ``ModelConfig``) types those keys and refuses any other: the YAML is the one
place their defaults are written, so its fields have none.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model
from torch import nn

from infra.tables import BEHAVIORS
from training.data import TrainingData

#: The early-stopping metric (standard setting, validation split), and the one a fitted model's
#: validation is reported with.
VALIDATION_METRIC = "NDCG@10"
#: Users per validation ranking batch (memory only).
EVAL_BATCH_SIZE = 2048


class _Strict(BaseModel):
    # A misspelt key would otherwise leave its default in force without a word.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_behaviors(weights: dict[str, float]) -> dict[str, float]:
    for behavior in weights:
        if behavior not in BEHAVIORS:
            near = difflib.get_close_matches(behavior, BEHAVIORS, n=1)
            hint = f"did you mean {near[0]}?" if near else f"behaviours: {', '.join(BEHAVIORS)}"
            raise ValueError(f"unknown behaviour {behavior!r}; {hint}")
    return weights


#: Weight per behaviour (the names of ``infra.tables.BEHAVIORS``); a behaviour absent from the
#: training tables weighs nothing.
BehaviorWeights = Annotated[dict[str, float], AfterValidator(_known_behaviors)]


class TrainConfig(_Strict):
    """The ``train`` section of a gradient-trained model: what the Trainer reads."""

    optimizer: Literal["adam", "adamw"]
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    batch_size: int = Field(gt=0)
    epochs: int = Field(gt=0)
    patience: int = Field(gt=0)
    eval_every: int = Field(gt=0)
    metric: str = VALIDATION_METRIC
    eval_batch_size: int = Field(default=EVAL_BATCH_SIZE, gt=0)


#: A fitted model's ``train`` section: it has no training loop, but the pipeline's and the
#: benchmarks' epoch cap reaches every model alike, so the section is accepted, checked for
#: misspelt keys, and ignored.
FittedTrainConfig = create_model(
    "FittedTrainConfig",
    __base__=_Strict,
    **{name: (field.annotation | None, None) for name, field in TrainConfig.model_fields.items()},
)


class ModelConfig(_Strict):
    """The keys every model has besides its family's: its name, the implementing module when that
    is not the name (``class``), the seed the trainer sets, and ``train`` (see TrainedModelConfig)."""

    name: str
    class_: str | None = Field(default=None, alias="class")
    seed: int = 0
    train: FittedTrainConfig | None = None


class TrainedModelConfig(ModelConfig):
    """A gradient-trained model's: its ``train`` section is the Trainer's settings."""

    train: TrainConfig


class PairSet:
    """Fast membership of (row, col) pairs in a sparse matrix: sorted int64 keys + binary search.
    ``values`` holds each stored pair's matrix value (duplicates summed), for ``lookup``."""

    def __init__(self, m: sp.spmatrix):
        coo = sp.coo_matrix(m)
        coo.sum_duplicates()
        self.n_cols = m.shape[1]
        keys = coo.row.astype(np.int64) * self.n_cols + coo.col.astype(np.int64)
        order = np.argsort(keys, kind="stable")
        self.keys, self.values = keys[order], coo.data[order]

    def _find(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.asarray(rows, np.int64) * self.n_cols + np.asarray(cols, np.int64)
        if not len(self.keys):
            return np.zeros(len(q), bool), np.zeros(len(q), np.int64)
        pos = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        return self.keys[pos] == q, pos

    def contains(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return self._find(rows, cols)[0]

    def lookup(self, rows: np.ndarray, cols: np.ndarray, default=0) -> np.ndarray:
        """Each pair's stored value, ``default`` where the pair is not stored."""
        found, pos = self._find(rows, cols)
        out = np.full(len(found), default, dtype=self.values.dtype)
        out[found] = self.values[pos[found]]
        return out


@dataclass
class Context:
    """A batch of users as a model sees them when it scores them, in the model's index space.

    Attributes:
        users: (B,) long: the model's user index of each row, -1 for a user it was not trained on.
        visited: (B, n_items) CSR: each row's visited set as of the scoring date (items the model
            does not know are absent).
        history: (B, L) long: the row's last L events' item indices, oldest first, left-padded
            with -1 (an event on an item the model does not know is -1 too); L is the model's
            ``history_length`` (0: no history is built).
        history_behavior: (B, L) long: each event's behaviour as its funnel position
            (``infra.tables.BEHAVIORS``), -1 where ``history`` is.
        history_time: (B, L) long: each event's time in epoch seconds, -1 where unknown or padded.
        exclude: (B, n_items) CSR or None: items the row's list will not show (what it bought),
            for a model that picks candidates before it scores (a two-stage model), so that it
            does not spend them on items masked afterwards. Scoring masks them whatever a model does.

    The three history tensors are one window of ``training.sequences.EventLog.windows``, the
    builder that training cuts its inputs with too.
    """

    users: torch.Tensor
    visited: sp.csr_matrix
    history: torch.Tensor
    history_behavior: torch.Tensor
    history_time: torch.Tensor
    exclude: sp.csr_matrix | None = None

    def __len__(self) -> int:
        return len(self.users)

    def rows(self, index) -> Context:
        """The rows ``index`` (a slice or an array of row numbers) as their own context."""
        return Context(
            self.users[index],
            self.visited[index],
            self.history[index],
            self.history_behavior[index],
            self.history_time[index],
            None if self.exclude is None else self.exclude[index],
        )

    def to(self, device) -> Context:
        return Context(
            self.users.to(device),
            self.visited,
            self.history.to(device),
            self.history_behavior.to(device),
            self.history_time.to(device),
            self.exclude,
        )

    @classmethod
    def of_training(cls, data: TrainingData, users, history_length: int = 0) -> Context:
        """Training users (indices of ``data``) in the context of ``data`` itself: its visited sets,
        its training events, its training purchases as ``exclude``. What the evaluator scores with."""
        u = torch.as_tensor(np.asarray(users.cpu() if torch.is_tensor(users) else users, np.int64))
        idx = u.numpy()
        window = data.history(idx, history_length)
        return cls(u, data.visited[idx], *(torch.from_numpy(x) for x in window), data.purchases[idx])


class Recommender(nn.Module):
    name: ClassVar[str] = ""
    #: Gradient-trained by the Trainer (True) or fitted once by ``fit()`` (False).
    trainable: ClassVar[bool] = True
    #: A second stage that re-ranks a fitted retriever's candidates (``training.ranking`` trains
    #: it); False for the models that rank the whole catalogue themselves.
    ranker: ClassVar[bool] = False
    #: Names of the experts ``explain`` reports weights for (empty for single-tower models).
    experts: ClassVar[tuple[str, ...]] = ()
    #: Per-row values ``explain`` also returns, each a column of ``infra.tables.SCORES_PREDICTED``
    #: (a two-stage model's retriever rank and score, ranker score); null for other models.
    details: ClassVar[tuple[str, ...]] = ()
    #: Recent events per user the model reads from its context (0: it reads none).
    history_length: ClassVar[int] = 0
    #: The typed form of the model's configuration (``<name>.yaml`` with overrides).
    Config: ClassVar[type[ModelConfig]] = ModelConfig

    def __init__(self, data: TrainingData, config: dict[str, Any]):
        super().__init__()
        #: As given: plain and JSON-able, what is logged to MLflow and saved with the model.
        self.config = dict(config)
        self.cfg = self.Config.model_validate(self.config)
        self.n_users, self.n_items = data.n_users, data.n_items
        self._visited = data.visited  # CSR, kept off the state dict (rebuilt from the tables)
        self._visited_pairs = PairSet(data.visited)

    # -- training ----------------------------------------------------------------------------
    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError(f"{self.name} is not gradient-trained")

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{self.name} is not gradient-trained")

    def fit(self) -> None:
        raise NotImplementedError(f"{self.name} is gradient-trained: use the Trainer")

    # -- scoring -----------------------------------------------------------------------------
    def scores(self, context: Context) -> torch.Tensor:
        """(B, n_items) scores of the context's users; higher is better. Rows ``can_score`` says
        False for may hold anything finite.

        A freshly allocated tensor (scoring masks it in place, without a copy), or a non-contiguous
        view such as a broadcast row (which scoring copies first); never a view of model state.
        """
        raise NotImplementedError

    def can_score(self, context: Context) -> torch.Tensor:
        """(B,) bool: rows whose scores mean something. By default the users the model was trained
        on; the scorer serves the others by its fallback."""
        return context.users >= 0

    def context_scorer(self, data: TrainingData) -> Callable[[torch.Tensor], torch.Tensor]:
        """Scores of ``data``'s users in ``data``'s own context (the evaluator's ``ScoreFn``)."""

        def score(users: torch.Tensor) -> torch.Tensor:
            return self.scores(Context.of_training(data, users, self.history_length).to(self.device))

        return score

    def is_visited(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(P,) bool: whether each (user, item) pair is in the user's *training* visited set."""
        vis = self._visited_pairs.contains(users.cpu().numpy(), items.cpu().numpy())
        return torch.from_numpy(vis).to(users.device)

    def explain(self, context: Context, rows: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per (row of the context, item), both (P,): ``visited`` (bool, from the context's visited
        sets) and one weight per expert. Single-tower models report no expert weights."""
        return {"visited": context_visited(context, rows, items)}

    def train(self, mode: bool = True):
        # Cached propagated embeddings are only valid until the parameters change.
        self._cache = None
        return super().train(mode)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")


def context_visited(context: Context, rows: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """(P,) bool: whether each item is in its row's visited set of ``context``."""
    vis = PairSet(context.visited).contains(rows.cpu().numpy(), items.cpu().numpy())
    return torch.from_numpy(vis).to(rows.device)


def bpr_triplets(
    purchases: sp.csr_matrix,
    rng: np.random.Generator,
    batch_size: int,
    device,
    hard: sp.csr_matrix | None = None,
    hard_fraction: float = 0.0,
    negatives: int = 1,
    candidates: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of (user, bought item, not-bought item) triplets, every purchase once, shuffled.

    Negatives are uniform over items the user did not buy (resampled up to 10 times on collision).
    With ``hard`` (a users x items CSR, e.g. the visited sets) a ``hard_fraction`` of the rows draw
    their negative uniformly from the user's not-bought items of ``hard`` instead; rows whose
    ``hard`` items are all bought keep their uniform negative. With ``negatives`` > 1, ``neg`` is
    (B, negatives), each column drawn the same way. With ``candidates`` > 1, ``neg`` is
    (B, negatives, candidates): every negative slot draws that many candidates, all from the pool
    (hard or uniform) the slot drew, for the model to pick from (dynamic negative sampling) without
    changing the share of hard negatives.
    """
    coo = purchases.tocoo()
    bought = PairSet(purchases)
    order = rng.permutation(coo.nnz)
    users, pos = coo.row[order].astype(np.int64), coo.col[order].astype(np.int64)
    n_items = purchases.shape[1]
    pool = None
    if hard is not None and hard_fraction > 0:
        # The hard items the user did not buy, once per epoch: sampling from them never collides.
        pool = (hard > 0).astype(np.float32)
        pool = (pool - pool.multiply(purchases > 0)).tocsr()
        pool.eliminate_zeros()
    for start in range(0, len(users), batch_size):
        u, p = users[start : start + batch_size], pos[start : start + batch_size]
        nu = np.repeat(u, negatives * candidates)
        neg = rng.integers(0, n_items, len(nu))
        for _ in range(10):
            clash = bought.contains(nu, neg)
            if not clash.any():
                break
            neg[clash] = rng.integers(0, n_items, int(clash.sum()))
        if pool is not None:
            hard_slot = rng.random(len(u) * negatives) < hard_fraction
            _hard_negatives(pool, nu, neg, np.repeat(hard_slot, candidates), rng)
        if candidates > 1:
            neg = neg.reshape(len(u), negatives, candidates)
        elif negatives > 1:
            neg = neg.reshape(len(u), negatives)
        yield {
            "users": torch.from_numpy(u).to(device),
            "pos": torch.from_numpy(p).to(device),
            "neg": torch.from_numpy(neg).to(device),
        }


def _hard_negatives(
    pool: sp.csr_matrix, users: np.ndarray, neg: np.ndarray, pick: np.ndarray, rng: np.random.Generator
) -> None:
    """Overwrite ``neg[pick]`` in place with a uniform item of the user's ``pool`` row (rows
    left empty keep their negative)."""
    lo, hi = pool.indptr[users], pool.indptr[users + 1]
    idx = np.flatnonzero(pick & (hi > lo))
    neg[idx] = pool.indices[lo[idx] + (rng.random(len(idx)) * (hi[idx] - lo[idx])).astype(np.int64)]


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Mean of -log σ(pos - neg); ``neg`` is (B,) or (B, n) negatives per positive."""
    if neg.dim() == 2:
        pos = pos.unsqueeze(1)
    return -torch.nn.functional.logsigmoid(pos - neg).mean()
