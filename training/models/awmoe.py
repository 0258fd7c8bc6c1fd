"""AW-MoE (Gong et al., JD, ICDE'23, arXiv 2306.05011) as the second stage: a retriever's top-N
candidates per shopper re-ranked by attention-gated experts that read the shopper's behaviour
sequence, with a contrastive loss on the gate for shoppers with few events.

Only the paper's abstract could be read (``../shared/notes/awmoe_fame.md`` §A). What it says, and
what this module takes from it: a mixture of experts ranks the candidates; the behaviour sequence
feeds both the experts and the gate; the gate has an *activation unit* and a *gate unit* that,
through attention, give a fine-grained weight vector over the experts; the sequence is randomly
masked to simulate long-tail shoppers, with an auxiliary contrastive loss on the gate's output.
Everything else is ours, and each choice is a key of ``awmoe.yaml`` (logged to MLflow with the
model's configuration):

- **the activation unit** is DIN's target attention (Zhou et al., KDD'18): for candidate ``c`` and
  each event ``j`` of the window, an MLP (``attention_hidden``, 80 -> 40 -> 1, sigmoid, as DIN's
  code) reads ``[e_c, h_j, e_c - h_j, e_c * h_j]``; ``attention_norm: softmax`` (DIN's code)
  normalises the weights over the window's events, ``none`` (RecBole's variant) leaves them as they
  are; ``s_c = sum_j a_cj h_j`` is the attended vector. ``h_j`` embeds the event's item, behaviour,
  time-gap bucket and session start (``training.sequences``); ``e_c`` the candidate, from the same
  item table. The first layer is applied to the four parts separately (the same product, without
  materialising the (B, N, L, 4d) concatenation, and the difference's part as the difference of
  the two parts);
- **the gate unit**: ``G = softmax_experts(W_2 relu(W_1 [s_c, e_c]))`` shaped (experts, width):
  one weight per expert *and hidden unit* of the experts' outputs, our reading of "fine-grained"
  (a softmax over the experts in every unit);
- **the experts**: ``experts`` two-layer ReLU MLPs of width ``expert_hidden`` over
  ``x_c = [s_c, e_c, s_c * e_c, p, r_c]`` (``p`` the mean of the window's events, the experts'
  own reading of the sequence; ``r_c`` the retriever's evidence: its score standardised over the
  row's candidates and log2(1 + its rank) / log2(1 + N)); the score is
  ``w . sum_e G_e * f_e(x_c) + b``;
- ``gate: false`` is the ungated ranker of the same size: one MLP of width
  ``experts x expert_hidden`` over the same ``x_c`` (the attended vector included), its output
  read by the same ``w``: what the gate adds is measured with everything else equal;
- **long-tail learning**: a second view of every training window with ``mask_ratio`` of its events
  dropped (at least one event kept; dropped events become padding, the way a shopper with fewer
  events looks); the gate logits at the purchased candidate of the full and of the masked view are
  pulled together by InfoNCE over the batch (cosine similarity / ``temperature``, the 2(B-1) other
  views as negatives, as CL4SRec), weight ``contrastive_weight`` (0: off);
- **the objective**: softmax cross-entropy over the row's N candidates with the purchased item as
  the label (listwise); a purchase its retriever did not put among the N candidates is not a
  training example (the ranker cannot move it). Model selection: NDCG@10 of the two-stage list on
  the validation users held out from the ranker's own labels (``training.ranking``).

**Two stages in one model.** The retriever is a submodule (``retriever``: its model name;
``retriever_config``: its configuration), frozen: the ranker's training never changes it, and the
state dict saved with the ranker holds both, so a saved two-stage model reloads and scores alone.
``scores`` returns the whole catalogue as the contract wants: the retriever's scores, with the N
candidates lifted above every other item in the ranker's order; so the evaluator, the scorer and the
pyfunc rank it like any model. Candidates skip the row's ``Context.exclude`` (what the shopper
bought), which scoring masks afterwards anyway.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from infra.tables import BEHAVIORS
from training.data import TrainingData
from training.models.base import Context, Recommender, TrainedModelConfig, context_visited
from training.sequences import GAP_BUCKETS, SequenceFeatures

#: Rows of candidates scored at once: the activation unit holds (rows, N, L, hidden) values.
CHUNK_ROWS = 64


class AWMoEConfig(TrainedModelConfig):
    """What each key means: ``awmoe.yaml``."""

    retriever: str
    retriever_config: dict[str, Any]
    candidates: int = Field(ge=2)
    max_len: int = Field(gt=0)
    dim: int = Field(gt=0)
    experts: int = Field(ge=1)
    expert_hidden: int = Field(gt=0)
    attention_hidden: list[int]
    attention_norm: Literal["softmax", "none"]
    gate: bool
    gate_hidden: int = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    session_gap_minutes: float = Field(gt=0)
    mask_ratio: float = Field(ge=0, lt=1)
    contrastive_weight: float = Field(ge=0)
    temperature: float = Field(gt=0)
    holdout: float = Field(gt=0, lt=1)


class ActivationUnit(nn.Module):
    """DIN's target attention: (B, N) candidates over (B, L) events -> weights (B, N, L)."""

    def __init__(self, dim: int, hidden: list[int], norm: str):
        super().__init__()
        if not hidden:
            raise ValueError("attention_hidden needs at least one layer")
        self.norm = norm
        # The first layer of the MLP over [e, h, e - h, e * h], split by part.
        self.cand = nn.Linear(dim, hidden[0])
        self.event = nn.Linear(dim, hidden[0], bias=False)
        self.diff = nn.Linear(dim, hidden[0], bias=False)
        self.prod = nn.Linear(dim, hidden[0], bias=False)
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(hidden):
            layers += [nn.Sigmoid(), nn.Linear(a, b)]
        self.rest = nn.Sequential(*layers, nn.Sigmoid(), nn.Linear(hidden[-1], 1))

    def forward(self, cand: torch.Tensor, events: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        e, h = cand.unsqueeze(2), events.unsqueeze(1)  # (B, N, 1, d), (B, 1, L, d)
        # W_d (e - h) = W_d e - W_d h (no bias): the candidate's and the events' parts are summed
        # small, (B, N, 1, H0) and (B, 1, L, H0); only e * h is (B, N, L, d).
        first = (self.cand(e) + self.diff(e)) + (self.event(h) - self.diff(h)) + self.prod(e * h)
        logits = self.rest(first).squeeze(-1)  # (B, N, L)
        if self.norm == "softmax":
            logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
            weights = torch.softmax(logits, -1)
            return torch.nan_to_num(weights, nan=0.0)  # a window with no event attends to nothing
        return logits * valid.unsqueeze(1)


def mask_events(valid: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, L) bool: ``valid`` with ``ratio`` of each row's events (rounded down) dropped at random,
    at least one kept in a row that has any."""
    b, length = valid.shape
    noise = torch.rand((b, length), generator=generator, device=valid.device)
    noise = noise.masked_fill(~valid, 2.0)  # padding sorts last, never drawn
    n_valid = valid.sum(1)
    n_drop = torch.minimum((n_valid.float() * ratio).floor().long(), (n_valid - 1).clamp(min=0))
    rank = noise.argsort(1).argsort(1)  # each position's place in its row's random order
    return valid & (rank >= n_drop.unsqueeze(1))


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of two views (B, D) of the same B rows: each view's positive is the other view of its
    row, its negatives the 2(B - 1) other views in the batch (cosine similarity / temperature)."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / temperature
    n = a.shape[0]
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def view_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How far apart two views (B, D) of the same rows are, relative to other rows: the mean over
    rows of the distance between a row's two (normalised) views divided by the mean distance from
    its first view to the other rows' second views. 1: a row's views are no closer than strangers';
    0: identical. Logged on every training step whatever the contrastive weight (NaN for one row)."""
    n = len(a)
    if n < 2:
        return torch.tensor(float("nan"))
    dist = torch.cdist(F.normalize(a, dim=1), F.normalize(b, dim=1))  # (B, B)
    others = (dist.sum(1) - dist.diagonal()) / (n - 1)
    return (dist.diagonal() / others.clamp(min=1e-12)).mean()


class AWMoE(Recommender):
    name = "awmoe"
    ranker = True
    details = ("retriever_rank", "retriever_score", "ranker_score")
    Config = AWMoEConfig
    cfg: AWMoEConfig

    def __init__(
        self,
        data: TrainingData,
        config: dict,
        retriever: Recommender | None = None,
        labels: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        """``retriever``: a fitted model to re-rank (else one is built from ``retriever`` and
        ``retriever_config``, for a saved model's weights to be loaded into); ``labels``: the
        (user, item) purchases of ``data`` the ranker trains on (``training.ranking`` chooses them)."""
        super().__init__(data, config)
        from training.models import build_model

        cfg = self.cfg
        if retriever is None:
            retriever = build_model(cfg.retriever, data, cfg.retriever_config)
        if retriever.name != cfg.retriever:
            raise ValueError(f"the retriever is {retriever.name}, the configuration says {cfg.retriever}")
        self.retriever = retriever.eval().requires_grad_(False)
        self.history_length = max(cfg.max_len, retriever.history_length)
        self._gap = cfg.session_gap_minutes * 60.0
        self._data, self._labels = data, labels
        self._examples: dict[str, np.ndarray] | None = None
        d = cfg.dim
        self.items = nn.Embedding(data.n_items + 1, d, padding_idx=0)
        self.behaviors = nn.Embedding(len(BEHAVIORS) + 1, d, padding_idx=0)
        self.gaps = nn.Embedding(GAP_BUCKETS, d, padding_idx=0)
        self.starts = nn.Embedding(2, d)
        for emb in (self.items, self.behaviors, self.gaps, self.starts):
            nn.init.normal_(emb.weight, std=0.05)
        self.attention = ActivationUnit(d, cfg.attention_hidden, cfg.attention_norm)
        n_in, width = 4 * d + 2, cfg.expert_hidden
        n_experts = cfg.experts if cfg.gate else 1
        hidden = width if cfg.gate else width * cfg.experts

        def mlp() -> nn.Module:
            return nn.Sequential(
                nn.Linear(n_in, hidden),
                nn.ReLU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
            )

        self.expert_nets = nn.ModuleList(mlp() for _ in range(n_experts))
        self.gate_unit = (
            nn.Sequential(
                nn.Linear(2 * d, cfg.gate_hidden), nn.ReLU(), nn.Linear(cfg.gate_hidden, cfg.experts * width)
            )
            if cfg.gate
            else None
        )
        self.out = nn.Linear(hidden, 1)
        self.experts = tuple(f"expert_{e}" for e in range(cfg.experts)) if cfg.gate else ()

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "retriever"):
            self.retriever.eval()  # frozen: no dropout, no cache reset between epochs
        return self

    # -- the two stages ----------------------------------------------------------------------
    def _retriever_context(self, context: Context) -> Context:
        length = self.retriever.history_length
        cut = slice(context.history.shape[1] - length, None) if length else slice(0, 0)
        return Context(
            context.users,
            context.visited,
            context.history[:, cut],
            context.history_behavior[:, cut],
            context.history_time[:, cut],
            context.exclude,
        )

    @torch.no_grad()
    def candidates(self, context: Context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The retriever's scores (B, n_items), its top-N candidates (B, N) (the row's ``exclude``
        skipped) and their scores (B, N)."""
        base = self.retriever.scores(self._retriever_context(context)).float()
        picked = base.clone()
        if context.exclude is not None and context.exclude.nnz:
            ex = context.exclude.tocoo()
            picked[
                torch.as_tensor(ex.row, device=base.device), torch.as_tensor(ex.col, device=base.device)
            ] = float("-inf")
        n = min(self.cfg.candidates, base.shape[1])
        values, items = torch.topk(picked, n, dim=1)
        return base, items, values

    def _events(self, context: Context) -> SequenceFeatures:
        cut = slice(context.history.shape[1] - self.cfg.max_len, None)
        return SequenceFeatures.of(
            context.history[:, cut], context.history_behavior[:, cut], context.history_time[:, cut], self._gap
        )

    def _embed_events(self, f: SequenceFeatures, valid: torch.Tensor) -> torch.Tensor:
        h = (
            self.items(f.items)
            + self.behaviors(f.behaviors)
            + self.gaps(f.gaps)
            + self.starts(f.session_start)
        )
        return h * valid.unsqueeze(-1)

    def forward_candidates(
        self, f: SequenceFeatures, valid: torch.Tensor, cands: torch.Tensor, retr: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Ranker scores (B, N) of candidates ``cands`` (item indices) given the retriever's scores
        ``retr`` (B, N, descending) and the window ``f`` with events ``valid``; also the attention
        weights (B, N, L), the gate logits (B, N, E * width) and weights (B, N, E, width), and each
        expert's contribution to the score (B, N, E); the attention covers only the window's last L'
        columns, L' the most events of any row (windows are right-aligned: the rest is padding)."""
        cfg = self.cfg
        width = int(f.valid.sum(1).max()) if len(valid) else 0
        cut = slice(f.valid.shape[1] - max(width, 1), None)
        f = SequenceFeatures(
            f.items[:, cut], f.behaviors[:, cut], f.gaps[:, cut], f.session_start[:, cut], f.valid[:, cut]
        )
        valid = valid[:, cut]
        h = self._embed_events(f, valid)
        e = self.items(cands + 1)  # (B, N, d)
        att = self.attention(e, h, valid)
        attended = torch.einsum("bnl,bld->bnd", att, h)
        count = valid.sum(1, keepdim=True).clamp(min=1)
        pooled = (h.sum(1) / count).unsqueeze(1).expand_as(e)
        n = cands.shape[1]
        z = (retr - retr.mean(1, keepdim=True)) / retr.std(1, keepdim=True).clamp(min=1e-6)
        rank = torch.log2(2 + torch.arange(n, device=cands.device, dtype=torch.float32)) / math.log2(1 + n)
        feats = torch.stack([torch.nan_to_num(z), rank.expand_as(z)], -1)
        x = torch.cat([attended, e, attended * e, pooled, feats], -1)
        outs = torch.stack([net(x) for net in self.expert_nets], 2)  # (B, N, E', width)
        result = {"attention": att}
        if self.gate_unit is None:
            mixed = outs[:, :, 0]
        else:
            logits = self.gate_unit(torch.cat([attended, e], -1))
            gate = torch.softmax(logits.view(*logits.shape[:2], cfg.experts, cfg.expert_hidden), 2)
            parts = gate * outs
            mixed = parts.sum(2)
            result.update(gate_logits=logits, gate=gate, contributions=parts @ self.out.weight.squeeze(0))
        result["scores"] = self.out(mixed).squeeze(-1)
        return result

    def rank_candidates(
        self, context: Context, cands: torch.Tensor, retr: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``forward_candidates`` of the rows' windows over their candidates ``cands`` (B, N) with
        the retriever's scores ``retr``, ``CHUNK_ROWS`` rows at a time; every output but the
        attention weights."""
        f = self._events(context)
        parts = [
            self.forward_candidates(
                SequenceFeatures(
                    *(t[i : i + CHUNK_ROWS] for t in (f.items, f.behaviors, f.gaps, f.session_start, f.valid))
                ),
                f.valid[i : i + CHUNK_ROWS],
                cands[i : i + CHUNK_ROWS],
                retr[i : i + CHUNK_ROWS],
            )
            for i in range(0, len(cands), CHUNK_ROWS)
        ]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "attention"}

    def _rerank(self, context: Context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        base, cands, retr = self.candidates(context)
        return base, cands, retr, self.rank_candidates(context, cands, retr)

    def scores(self, context: Context) -> torch.Tensor:
        base, cands, _, out = self._rerank(context)
        ranker = out["scores"].to(base.dtype)
        # The candidates above every other item, in the ranker's order; the rest in the retriever's.
        lift = base.max(1, keepdim=True).values - ranker.min(1, keepdim=True).values + 1.0
        return base.scatter(1, cands, ranker + lift)

    def can_score(self, context: Context) -> torch.Tensor:
        return self.retriever.can_score(self._retriever_context(context))

    def explain(self, context: Context, rows: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        """Besides ``visited`` and each expert's signed share of the ranker's score (``w_expert_e``;
        none for the ungated ranker): ``retriever_rank`` (1-based; NaN when the item is not a
        candidate), ``retriever_score`` and ``ranker_score`` (NaN when not a candidate)."""
        _, cands, retr, out = self._rerank(context)
        hit = cands[rows] == items.unsqueeze(1)  # (P, N)
        found = hit.any(1)
        pos = hit.float().argmax(1)
        why = {
            "visited": context_visited(context, rows, items),
            "retriever_rank": torch.where(found, (pos + 1).double(), float("nan")),
            "retriever_score": torch.where(found, retr[rows, pos], float("nan")),
            "ranker_score": torch.where(found, out["scores"][rows, pos], float("nan")),
        }
        if "contributions" in out:
            parts = out["contributions"][rows, pos]  # (P, E)
            shares = parts / parts.abs().sum(1, keepdim=True).clamp(min=1e-12)
            shares = torch.where(found.unsqueeze(1), shares, 0.0)
            why.update({f"w_{name}": shares[:, i] for i, name in enumerate(self.experts)})
        return why

    # -- training ----------------------------------------------------------------------------
    def examples(self) -> dict[str, np.ndarray]:
        """Every label the retriever put among its candidates: user, candidates (E, N), their
        retriever scores and the label's position; computed once (the retriever is frozen). Also
        ``recall``: the share of labels among the candidates."""
        if self._examples is None:
            if self._labels is None:
                raise ValueError("awmoe trains on labels chosen by training.ranking (fit_ranker)")
            users, items = self._labels
            dev = self.device
            cands, retr = [], []
            for start in range(0, len(users), 1024):
                ctx = Context.of_training(self._data, users[start : start + 1024], self.history_length).to(
                    dev
                )
                _, c, r = self.candidates(ctx)
                cands.append(c.cpu().numpy())
                retr.append(r.float().cpu().numpy())
            c = np.concatenate(cands) if cands else np.zeros((0, self.cfg.candidates), np.int64)
            r = np.concatenate(retr) if retr else np.zeros((0, self.cfg.candidates), np.float32)
            hit = c == items[:, None]
            keep = hit.any(1)
            self._examples = {
                "users": users[keep],
                "candidates": c[keep],
                "retriever": r[keep],
                "label": hit[keep].argmax(1),
                "recall": np.array(keep.mean() if len(keep) else 0.0),
            }
        return self._examples

    def batches(self, rng: np.random.Generator, batch_size: int):
        ex = self.examples()
        order = rng.permutation(len(ex["users"]))
        dev = self.device
        for start in range(0, len(order), batch_size):
            pick = order[start : start + batch_size]
            items, behaviors, times = self._data.history(ex["users"][pick], self.cfg.max_len)
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            f = SequenceFeatures.of(*(torch.from_numpy(x) for x in (items, behaviors, times)), self._gap)
            yield {
                "items": f.items.to(dev),
                "behaviors": f.behaviors.to(dev),
                "gaps": f.gaps.to(dev),
                "session_start": f.session_start.to(dev),
                "valid": f.valid.to(dev),
                "masked": mask_events(f.valid, self.cfg.mask_ratio, gen).to(dev),
                "candidates": torch.from_numpy(ex["candidates"][pick]).to(dev),
                "retriever": torch.from_numpy(ex["retriever"][pick]).to(dev),
                "label": torch.from_numpy(ex["label"][pick]).to(dev),
            }

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        f = SequenceFeatures(
            batch["items"], batch["behaviors"], batch["gaps"], batch["session_start"], batch["valid"]
        )
        full = self.forward_candidates(f, f.valid, batch["candidates"], batch["retriever"])
        ce = F.cross_entropy(full["scores"].float(), batch["label"])
        out = {"loss": ce, "ce": ce}
        if self.gate_unit is not None:
            rows = torch.arange(len(batch["label"]), device=ce.device)
            learn = self.cfg.contrastive_weight > 0 and len(rows) > 1
            with torch.set_grad_enabled(learn and torch.is_grad_enabled()):
                masked = self.forward_candidates(f, batch["masked"], batch["candidates"], batch["retriever"])
            a, b = full["gate_logits"][rows, batch["label"]], masked["gate_logits"][rows, batch["label"]]
            out["gate_view_distance"] = view_distance(a.detach().float(), b.detach().float())
            if learn:
                cl = info_nce(a.float(), b.float(), self.cfg.temperature)
                out["contrastive"] = cl
                out["loss"] = ce + self.cfg.contrastive_weight * cl
        return out
