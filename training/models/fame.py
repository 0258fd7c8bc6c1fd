"""FAME (Liu, Zhang & Long, WSDM'25, arXiv 2411.01457): SASRec whose last attention layer gives
every head its own next-item prediction, with a mixture of experts over the query projection inside
each head and a gate over the heads (``../shared/notes/awmoe_fame.md`` §B).

As built here (the equations follow two independent re-implementations of the paper; d the hidden
size, H heads, d' = d / H, N experts per head, X the input of the last layer, t its last position):

- layers 1 .. L-1 are SASRec's blocks (``training.models.sequential``); only the last is FAME's;
- keys and values per head, shared by its experts: ``K(h) = X W_K(h)``, ``V(h) = X W_V(h)``;
  each expert has its own query ``Q(h,n) = X W_Q(h,n)``; ``f(h,n) = softmax(Q K^T / sqrt(d') + mask) V``;
- the router of head h: ``beta(h) = softmax([f(h,1) | ... | f(h,N)] W_exp(h))`` (dense, no bias),
  ``f(h) = sum_n beta(h)_n f(h,n)``;
- ``F(h) = LN(a + FFN'(a))`` with ``a = LN(X(h) + f(h))``, FFN' a 2-layer ReLU MLP of width d' shared
  by the heads;
- each head scores the items by its own sub-embedding of the one item table:
  ``P(h)(v) = (x_v W_f(h)) . F_t(h)``; the gate ``g = softmax(W_g [F_t(1) | ... | F_t(H)] + b_g)``;
  ``P(v) = sum_h g_h P(h)(v)``; full-softmax cross-entropy, no auxiliary loss.

Choices the paper's available text leaves open, and what was chosen (each a key of ``fame.yaml``,
logged to MLflow with the model's configuration):

- N experts per head: ``experts`` 4, H: ``heads`` 4, layers 2, max_len 50, dropout 0.2 (the second
  re-implementation's N, H and layers; the paper's values could not be read);
- the residual around the mixture: X split into its heads (``residual: split``; ``project`` uses
  ``X W_K(h)``, as the first re-implementation does);
- pre-LayerNorm on X before keys, values and queries, as SASRec's blocks here;
- dropout on the attention probabilities and after FFN'; no load-balancing loss on the routers
  or the head gate (neither re-implementation has one, nothing found says the paper has). As an
  option (ours, ``gate_balance``, off by default), the head gate's usage over each training batch
  is pulled towards uniform: the term ``H * sum_h (mean_batch g_h)^2 - 1`` (the squared
  coefficient of variation of the heads' importance, as Shazeer et al.'s 2017 balancing loss; 0
  when the heads are used equally, H - 1 when one head takes every row) is added with that weight.
  Each row's gate may stay sharp; only the batch's average is balanced. The term is logged on every
  training step, whatever its weight, so a collapsing gate shows in MLflow;
- the repeat path, input features and targets are SASRec's, with the same defaults
  (``training.models.sequential``); with the repeat path on, its share is reported beside the heads;
- the FAME layer computes only the last position, the one every objective and score reads.

``explain`` reports, per recommended item, each head's contribution ``g_h P(h)(v)`` (and the
repeat path's), divided by the sum of their absolute values: signed shares whose absolute values
add to 1; the scored row's ``expert`` is the head with the largest share.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from training.data import TrainingData
from training.models.base import Context, context_visited
from training.models.sequential import SequenceConfig, SequenceEncoder, SequenceRecommender
from training.sequences import SequenceFeatures


class FameConfig(SequenceConfig):
    """What each key means: ``fame.yaml`` and ``sasrec.yaml``."""

    experts: int = Field(ge=1)
    residual: Literal["split", "project"]
    gate_balance: float = Field(ge=0)


class FacetLayer(nn.Module):
    """FAME's last layer at the window's last position: per-head MoE attention, FFN', head gate."""

    def __init__(self, dim: int, heads: int, experts: int, dropout: float, residual: str):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.experts, self.sub = heads, experts, dim // heads
        self.residual, self.dropout = residual, dropout
        self.norm = nn.LayerNorm(dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, heads * experts * self.sub)
        self.router = nn.Parameter(torch.empty(heads, experts * self.sub, experts))
        nn.init.xavier_uniform_(self.router)
        self.ffn = nn.Sequential(
            nn.Linear(self.sub, self.sub), nn.ReLU(), nn.Dropout(dropout), nn.Linear(self.sub, self.sub)
        )
        self.norm_a, self.norm_b = nn.LayerNorm(self.sub), nn.LayerNorm(self.sub)
        self.drop = nn.Dropout(dropout)
        self.item_proj = nn.Parameter(torch.empty(heads, dim, self.sub))
        for h in range(heads):
            nn.init.xavier_uniform_(self.item_proj[h])
        self.gate = nn.Linear(dim, heads)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        b, length, _ = x.shape
        h, n, k = self.heads, self.experts, self.sub
        xn = self.norm(x)
        keys = self.key(xn).view(b, length, h, k).transpose(1, 2)  # (B, H, L, d')
        values = self.value(xn).view(b, length, h, k).transpose(1, 2)
        queries = self.query(xn[:, -1]).view(b, h, n, k)  # (B, H, N, d'): the last position only
        logits = torch.einsum("bhnk,bhlk->bhnl", queries, keys) / math.sqrt(k)
        allowed = valid.clone()
        allowed[:, -1] = True  # the query attends to itself: no NaN for an empty window
        logits = logits.masked_fill(~allowed[:, None, None, :], float("-inf"))
        att = F.dropout(torch.softmax(logits, -1), self.dropout, self.training)
        per_expert = torch.einsum("bhnl,bhlk->bhnk", att, values)  # f(h, n)
        beta = torch.softmax(torch.einsum("bhm,hme->bhe", per_expert.reshape(b, h, n * k), self.router), -1)
        mixed = (beta.unsqueeze(-1) * per_expert).sum(2)  # (B, H, d')
        base = x[:, -1].view(b, h, k) if self.residual == "split" else keys[:, :, -1]
        a = self.norm_a(base + self.drop(mixed))
        facets = self.norm_b(a + self.drop(self.ffn(a)))  # F_t(h)
        gate = torch.softmax(self.gate(facets.reshape(b, h * k)), -1)  # (B, H)
        queries_d = torch.einsum("hdk,bhk->bhd", self.item_proj, facets)  # W_f(h) F_t(h), (B, H, d)
        return {"facets": facets, "gate": gate, "head_queries": queries_d}


class FAME(SequenceRecommender):
    name = "fame"
    Config = FameConfig
    cfg: FameConfig

    def __init__(self, data: TrainingData, config: dict):
        super().__init__(data, config)
        cfg = self.cfg
        self.encoder = SequenceEncoder(self.n_items, cfg, cfg.layers - 1)
        self.facet = FacetLayer(cfg.dim, cfg.heads, cfg.experts, cfg.dropout, cfg.residual)
        self.experts = (*(f"head_{h}" for h in range(cfg.heads)), *(("repeat",) if cfg.repeat else ()))
        self._gate: torch.Tensor | None = None  # the head gate of the training batch just scored

    def facets(self, f: SequenceFeatures) -> dict[str, torch.Tensor]:
        x, _ = self.encoder(f)
        return self.facet(x, f.valid)

    def head(self, f: SequenceFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.facets(f)
        if self.training:
            self._gate = out["gate"]
        query = (out["gate"].unsqueeze(-1) * out["head_queries"]).sum(1)  # sum_h g_h W_f(h) F_t(h)
        state = out["facets"].flatten(1)
        return state, query @ self.encoder.items.weight[1:].T

    def auxiliary_losses(self) -> dict[str, tuple[float, torch.Tensor]]:
        gate, self._gate = self._gate, None
        if gate is None:
            return {}
        importance = gate.mean(0)
        return {"gate_balance": (self.cfg.gate_balance, importance.numel() * importance.square().sum() - 1)}

    def explain(self, context: Context, rows: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.context_features(context)
        out = self.facets(f)
        emb = self.encoder.items.weight[1:][items]  # (P, d)
        parts = out["gate"][rows] * torch.einsum("phd,pd->ph", out["head_queries"][rows], emb)  # (P, H)
        if self.repeat is not None:
            repeat = self.repeat.of_items(f, out["facets"].flatten(1), rows, items)
            parts = torch.cat([parts, repeat.unsqueeze(1)], 1)
        shares = parts / parts.abs().sum(1, keepdim=True).clamp(min=1e-12)
        why = {"visited": context_visited(context, rows, items)}
        why.update({f"w_{name}": shares[:, i] for i, name in enumerate(self.experts)})
        return why
