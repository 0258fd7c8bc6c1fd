"""What SASRec and FAME share: the sequence input, the Transformer blocks, the training examples,
the losses and the repeat path. The models differ only in the layer that turns the encoded window
into a user state and item scores (``SequenceRecommender.head``).

**Input** (``training.sequences``): the ``max_len`` events before the target (training) or after
the user's last event (evaluation and scoring), cut by one builder, ``EventLog.windows``, and read
by one function, ``SequenceFeatures.of``; the target is always predicted from the window's last
position. Each event is embedded as item + position + behaviour (``behavior_embedding``) + time
gap bucket and session start (``time_features``; a session starts where the gap exceeds
``session_gap_minutes``, sessionize's default inactivity gap).

**Masks**: causal, and keys that are padding are masked; every query may attend to itself, so a
fully padded row attends to its own zero vector instead of a softmax over nothing (no NaN, as
RePlay does it). Padding positions are zeroed after every block.

**Training examples** (``targets``): ``purchases``: every training purchase with at least one event
before it; ``all``: every event after a user's first, purchases weighted ``purchase_weight``. Each
example is its own window ending just before the target (the "last position of every prefix"
objective). The seq2seq form, one window per user with a loss at every position, is cheaper per
event but predicts most targets from positions scoring never uses; it is not built.

**Losses** (``loss``): ``ce``, full-softmax cross-entropy over the whole catalogue (the strongest
published SASRec variant; Klenitskiy & Vasilev, RecSys'23); ``bce``, the original one-negative
binary cross-entropy, one uniform negative per target (not the target itself).

**Repeat path** (``repeat``, our addition): most purchases are of an item already in the window,
which a next-item objective over the catalogue ranks low. With it on, each item of the window gets
a learned bias by the deepest funnel stage the window shows for it and the recency of its last
occurrence (8 log2 buckets), scaled per user by a softplus of the user state: the model learns how
much a viewed, carted or favoured item of the window is worth, per shopper.

Users the model never saw are scored from their window alone (``can_score``: any event on an item
the model knows), so a shopper first seen on the scoring date gets model rows.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from infra.tables import BEHAVIORS, PURCHASE
from training.data import TrainingData
from training.models.base import Context, Recommender, TrainedModelConfig
from training.sequences import (
    GAP_BUCKETS,
    RECENCY_BUCKETS,
    EventLog,
    SequenceFeatures,
    recency_and_stage,
    training_windows,
)


class SequenceConfig(TrainedModelConfig):
    """What each key means: ``sasrec.yaml``."""

    max_len: int = Field(gt=0)
    dim: int = Field(gt=0)
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)
    init_std: float = Field(gt=0)
    behavior_embedding: bool
    time_features: bool
    session_gap_minutes: float = Field(gt=0)
    loss: Literal["ce", "bce"]
    targets: Literal["purchases", "all"]
    purchase_weight: float = Field(gt=0)
    repeat: bool


def attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool, True where query i may attend to key j: j <= i and j is an event, or j = i."""
    length = valid.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=valid.device))
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye).unsqueeze(1)


class Block(nn.Module):
    """A pre-LayerNorm Transformer block: masked multi-head self-attention, then a point-wise GELU FFN."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        # Point-wise FFN of width dim, as the original SASRec and SASRec+ (RecBole widens it 4x;
        # on 2 CPU cores its dropout masks alone were a third of a training step).
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = (
            self.qkv(self.norm1(x)).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        )
        p = self.dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        x = x + self.drop(self.out(att.transpose(1, 2).reshape(b, length, d)))
        x = x + self.drop(self.ffn(self.norm2(x)))
        return x * valid.unsqueeze(-1)


class SequenceEncoder(nn.Module):
    """Embeddings of a window and ``blocks`` Transformer blocks over them: (B, L, dim)."""

    def __init__(self, n_items: int, cfg: SequenceConfig, blocks: int):
        super().__init__()
        d = cfg.dim
        self.cfg = cfg
        self.items = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.positions = nn.Embedding(cfg.max_len, d)
        self.behaviors = (
            nn.Embedding(len(BEHAVIORS) + 1, d, padding_idx=0) if cfg.behavior_embedding else None
        )
        self.gaps = nn.Embedding(GAP_BUCKETS, d, padding_idx=0) if cfg.time_features else None
        self.starts = nn.Embedding(2, d) if cfg.time_features else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.dropout) for _ in range(blocks))
        for emb in (self.items, self.positions, self.behaviors, self.gaps, self.starts):
            if emb is not None:
                nn.init.normal_(emb.weight, std=cfg.init_std)
                if emb.padding_idx is not None:
                    with torch.no_grad():
                        emb.weight[emb.padding_idx].zero_()

    def forward(self, f: SequenceFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoded window (B, L, dim) and its attention mask."""
        length = f.items.shape[1]
        x = self.items(f.items) + self.positions.weight[-length:]
        if self.behaviors is not None:
            x = x + self.behaviors(f.behaviors)
        if self.gaps is not None:
            x = x + self.gaps(f.gaps) + self.starts(f.session_start)
        x = self.drop(x) * f.valid.unsqueeze(-1)
        mask = attention_mask(f.valid)
        for block in self.blocks:
            x = block(x, mask, f.valid)
        return x, mask


class RepeatPath(nn.Module):
    """Scores of the window's own items: bias[stage, recency] x softplus(w . state + b)."""

    def __init__(self, dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(len(BEHAVIORS) + 1, RECENCY_BUCKETS))
        self.scale = nn.Linear(dim, 1)

    def forward(
        self, f: SequenceFeatures, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per window position: the item index (0 where nothing is added), the bias added and
        whether it is added (the item's last occurrence)."""
        last, recency, stage = recency_and_stage(f)
        value = self.bias[stage, recency] * F.softplus(self.scale(state))
        value = torch.where(last, value, torch.zeros_like(value))
        index = torch.where(last, f.items - 1, torch.zeros_like(f.items))
        return index, value, last

    def add_to(self, scores: torch.Tensor, f: SequenceFeatures, state: torch.Tensor) -> torch.Tensor:
        index, value, _ = self(f, state)
        # In place: ``scores`` is a fresh product whose backward does not read it, and a copy of a
        # (batch x catalogue) tensor per step is a tenth of an epoch.
        return scores.scatter_add_(1, index, value.to(scores.dtype))

    def of_items(
        self, f: SequenceFeatures, state: torch.Tensor, rows: torch.Tensor, items: torch.Tensor
    ) -> torch.Tensor:
        """(P,) the repeat score of ``items[p]`` in the window of row ``rows[p]`` (0 when it is not
        in it). Computed once per row of ``f``, then looked up per pair: (P, L), never (P, L, L)."""
        index, value, last = self(f, state)
        hit = last[rows] & (index[rows] == items.unsqueeze(1))
        return (value[rows] * hit).sum(1)


class SequenceRecommender(Recommender):
    """A next-item model over each user's recent events; subclasses define ``head``."""

    Config = SequenceConfig
    cfg: SequenceConfig

    def __init__(self, data: TrainingData, config: dict):
        super().__init__(data, config)
        #: Instance value: the window length is a setting (the serving context carries
        #: ``scoring.history_length`` events; the shorter of the two is what scoring sees).
        self.history_length = self.cfg.max_len
        self._gap = self.cfg.session_gap_minutes * 60.0
        self._data = data  # its events are read when training starts, never to score
        self.repeat = RepeatPath(self.cfg.dim) if self.cfg.repeat else None

    # -- input -------------------------------------------------------------------------------
    def features(self, items, behaviors, times) -> SequenceFeatures:
        dev = self.device
        return SequenceFeatures.of(
            torch.as_tensor(items, device=dev),
            torch.as_tensor(behaviors, device=dev),
            torch.as_tensor(times, device=dev),
            self._gap,
        )

    def context_features(self, context: Context) -> SequenceFeatures:
        return self.features(context.history, context.history_behavior, context.history_time)

    def head(self, f: SequenceFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """(user state (B, dim) that the repeat path reads, catalogue scores (B, n_items))."""
        raise NotImplementedError

    def item_scores(self, f: SequenceFeatures) -> torch.Tensor:
        state, scores = self.head(f)
        if self.repeat is not None:
            scores = self.repeat.add_to(scores, f, state)
        return scores

    # -- training ----------------------------------------------------------------------------
    @property
    def _log(self) -> EventLog:
        data = self._data
        if data.manifest is not None and not data.has_times:
            raise ValueError(
                f"{self.name} reads each shopper's events in time order; the training events of "
                f"{data.root} have no times (a benchmark such as Tmall): sequence models are not run on it"
            )
        return data.events

    def examples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(user, position, target item, weight) of every training example."""
        log = self._log
        purchase = BEHAVIORS.index(PURCHASE)
        is_buy = log.behaviors == purchase
        targets = is_buy if self.cfg.targets == "purchases" else np.ones(len(log.items), bool)
        users, positions = training_windows(log, np.arange(log.n_users), targets)
        flat = log.indptr[users] + positions
        weight = np.where(is_buy[flat], self.cfg.purchase_weight if self.cfg.targets == "all" else 1.0, 1.0)
        return users, positions, log.items[flat], weight.astype(np.float32)

    def batches(self, rng: np.random.Generator, batch_size: int):
        users, positions, targets, weights = self.examples()
        order = rng.permutation(len(users))
        dev = self.device
        for start in range(0, len(order), batch_size):
            pick = order[start : start + batch_size]
            items, behaviors, times = self._log.windows(users[pick], self.cfg.max_len, positions[pick])
            batch = {
                "items": torch.from_numpy(items).to(dev),
                "behaviors": torch.from_numpy(behaviors).to(dev),
                "times": torch.from_numpy(times).to(dev),
                "target": torch.from_numpy(targets[pick]).to(dev),
                "weight": torch.from_numpy(weights[pick]).to(dev),
            }
            if self.cfg.loss == "bce":
                neg = rng.integers(0, self.n_items - 1, len(pick))
                neg = neg + (neg >= targets[pick])  # uniform over the items other than the target
                batch["neg"] = torch.from_numpy(neg).to(dev)
            yield batch

    def auxiliary_losses(self) -> dict[str, tuple[float, torch.Tensor]]:
        """Terms a subclass adds to the loss of the batch just scored, as (weight, value); each is
        logged under its name. None here."""
        return {}

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        f = self.features(batch["items"], batch["behaviors"], batch["times"])
        scores = self.item_scores(f).float()
        w = batch["weight"]
        if self.cfg.loss == "ce":
            per = F.cross_entropy(scores, batch["target"], reduction="none")
        else:
            pos = scores.gather(1, batch["target"][:, None]).squeeze(1)
            neg = scores.gather(1, batch["neg"][:, None]).squeeze(1)
            per = -(F.logsigmoid(pos) + F.logsigmoid(-neg))
        main = (per * w).sum() / w.sum()
        out = {"loss": main, self.cfg.loss: main}
        for name, (weight, value) in self.auxiliary_losses().items():
            out["loss"] = out["loss"] + weight * value
            out[name] = value
        return out

    # -- scoring -----------------------------------------------------------------------------
    def scores(self, context: Context) -> torch.Tensor:
        return self.item_scores(self.context_features(context))

    def can_score(self, context: Context) -> torch.Tensor:
        return (context.history >= 0).any(1)
