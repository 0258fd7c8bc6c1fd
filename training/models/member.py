"""MEMBER (Kim et al., CIKM'25, arXiv 2508.19507): a mixture of a visited-item and an unvisited-item
expert, as the paper describes it (``../shared/notes/member.md`` §2).

- Two experts with no shared parameters. Each has a *global* sub-expert (LightGCN over the union of
  all behaviour graphs, own embeddings) and a *local* sub-expert (one LightGCN per behaviour graph
  over shared local embeddings, averaged over behaviours). Expert score:
  ``s_ui = λ <E_u^glob, H_i^glob> + (1 - λ) <E_u^loc, H_i^loc>``.
- Hard gating: an item in the user's visited set is scored by the visited expert, any other item
  by the unvisited expert. No gating network.
- Visited expert: visit-filtering contrastive loss (InfoNCE, temperature τ) between its local
  embeddings and its local layer-0 embeddings propagated over E(V) = purchases that were preceded by
  an auxiliary behaviour.
- Unvisited expert: novelty-inferring contrastive loss (τ') between its global embeddings and its
  global layer-0 embeddings propagated over E(R) = all edges minus E(V); and a behaviour-generative
  loss: for every behaviour pair m before n in the funnel, behaviour n's local embeddings predict
  the edges of G(m) (BCE against sampled non-edges).
- BPR on purchases with the gated score. The paper does not say how negatives are drawn; here
  each purchase gets ``negatives`` slots and each slot keeps the highest-scored of
  ``negative_candidates`` draws (dynamic negative sampling; ``member.yaml`` says why,
  ``bench/README.md`` has the measurements behind the defaults). The experts share no parameters,
  so one optimiser on ``L_BPR + γ1 L_V_CL + γ2 L_U_CL + γ3 L_U_GEN`` gives each expert exactly the
  gradient of its own objective (paper Eq. 11-13) in a single pass per step.

Speed: every graph is propagated once per step and shared by all losses of the step; the two
experts' embeddings on a common graph (union, each behaviour) are propagated together as one
2d-wide sparse product. Nothing dense in users x items is built during training.

Our additions, off by default: ``funnel_bias`` (the model ``member_funnel`` turns it on): the
visited expert's score of a visited item gets a learned weight per auxiliary behaviour the user
showed on that item (a few scalars, zero at the start); ``item_bias``: a learned scalar per item
added to the unvisited expert's score; ``popularity_prior``: one learned weight on the log of each
item's training purchases, added to the unvisited expert's score and fitted on purchases of items
new to the shopper; ``rank_loss: softmax``: a sampled softmax over each purchase and a shared
uniform draw of items in place of BPR. ``reg_experts`` says whose embeddings the L2
term covers: both by default, where the reference code covers the visited expert's only (issue #26
measures these options on validation, ``bench/member_ablation.py``).

Deliberately not copied from the reference code: its 3 passes per epoch with stale embeddings, the
α-scaled negative in BPR, layer-normalised LightGCN variants, and the dense visited mask.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from infra.tables import BEHAVIORS, VISIT_BEHAVIORS
from training.data import TrainingData
from training.models.base import (
    Context,
    PairSet,
    Recommender,
    TrainedModelConfig,
    bpr_loss,
    bpr_triplets,
    context_visited,
)
from training.models.graph import normalized_adjacency, propagate


class MemberConfig(TrainedModelConfig):
    """What each key means: ``member.yaml``."""

    dim: int = Field(gt=0)
    layers: int = Field(ge=0)
    init_std: float = Field(gt=0)
    lambda_visited: float = Field(ge=0, le=1)
    lambda_unvisited: float = Field(ge=0, le=1)
    gamma_visited_cl: float = Field(ge=0)
    tau_visited: float = Field(gt=0)
    gamma_unvisited_cl: float = Field(ge=0)
    tau_unvisited: float = Field(gt=0)
    gamma_generative: float = Field(ge=0)
    cl_rows: int = Field(gt=0)
    gen_positives: int = Field(gt=0)
    gen_negatives: int = Field(ge=0)
    reg: float = Field(ge=0)
    reg_experts: list[Literal["visited", "unvisited"]]
    item_bias: bool
    popularity_prior: bool
    negatives: int = Field(gt=0)
    visited_negatives: float = Field(ge=0, le=1)
    negative_candidates: int = Field(gt=0)
    rank_loss: Literal["bpr", "softmax"]
    softmax_negatives: int = Field(gt=0)
    softmax_temperature: float = Field(gt=0)
    funnel_bias: bool


class ExpertParams(nn.Module):
    """Layer-0 embeddings of one expert: global (union graph) and local (shared across behaviours)."""

    def __init__(self, n_users: int, n_items: int, dim: int, init_std: float):
        super().__init__()
        self.glob = nn.Parameter(torch.randn(n_users + n_items, dim) * init_std)
        self.loc = nn.Parameter(torch.randn(n_users + n_items, dim) * init_std)


def pair_block(m: sp.csr_matrix, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(len(users), len(items)) dense: ``m``'s value at every (user, item) pair of the two lists
    (``items`` distinct); read from the users' rows only, never a dense users x items matrix."""
    column = np.full(m.shape[1], -1, np.int64)
    column[items] = np.arange(len(items))
    rows = m[users]
    pos = column[rows.indices]
    row = np.repeat(np.arange(len(users)), np.diff(rows.indptr))
    keep = pos >= 0
    out = np.zeros((len(users), len(items)), m.dtype)
    out[row[keep], pos[keep]] = rows.data[keep]
    return out


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE on cosine similarity: row i of ``a`` should match row i of ``b`` against the others."""
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    logits = a @ b.T / temperature
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


class Member(Recommender):
    name = "member"
    experts = ("visited", "unvisited")
    Config = MemberConfig
    cfg: MemberConfig

    def __init__(self, data: TrainingData, config: dict):
        super().__init__(data, config)
        c = self.cfg
        self.dim, self.layers = c.dim, c.layers
        self.lam = {"visited": c.lambda_visited, "unvisited": c.lambda_unvisited}
        self.n = data.n_users + data.n_items
        self.behaviors = [b for b in BEHAVIORS if b in data.matrices]  # funnel order, purchase last
        self.V = ExpertParams(data.n_users, data.n_items, self.dim, c.init_std)
        self.U = ExpertParams(data.n_users, data.n_items, self.dim, c.init_std)

        purchases = data.purchases
        e_v = visit_filtered_edges(purchases, data.visited)
        e_r = (data.union - data.union.multiply(e_v)).tocsr()  # every other edge
        e_r.eliminate_zeros()
        self._purchases = purchases
        self._edges = {b: data.matrices[b].tocoo() for b in self.behaviors}
        self._graphs = {
            "union": normalized_adjacency(data.union),
            "E_V": normalized_adjacency(e_v),
            "E_R": normalized_adjacency(e_r),
            **{f"b:{b}": normalized_adjacency(data.matrices[b]) for b in self.behaviors},
        }
        self._gen_pairs = [(m, n) for i, m in enumerate(self.behaviors) for n in self.behaviors[i + 1 :]]
        self._gen_rng = np.random.default_rng(c.seed)
        self._softmax_rng = np.random.default_rng([c.seed, 2])
        self._cache = None
        # Funnel bias (ours, off = the paper's expert): the visited expert's score of a visited item
        # gets a learned weight per auxiliary behaviour the user showed on it. Its embeddings are an
        # average over the user's neighbourhood and cannot tell which of the user's own items were
        # carted rather than only viewed; on RetailRocket that is most of what ranks a visited set.
        self._funnel_behaviors = [b for b in self.behaviors if b in VISIT_BEHAVIORS]
        self.funnel = None
        if c.funnel_bias and self._funnel_behaviors:
            self.funnel = nn.Parameter(torch.zeros(len(self._funnel_behaviors)))
            codes = sum(
                (data.matrices[b] > 0).astype(np.int64) * (1 << k)
                for k, b in enumerate(self._funnel_behaviors)
            )
            self._funnel_csr = sp.csr_matrix(codes)
            self._funnel_codes = PairSet(self._funnel_csr)
        # Item bias (ours, off = the paper's expert): one learned scalar per item added to the
        # unvisited expert's score, a popularity term its dot products must otherwise encode.
        self.item_bias = nn.Parameter(torch.zeros(data.n_items)) if c.item_bias else None
        # Popularity prior (ours, off = the paper's expert): the unvisited expert's score gets
        # w * log(1 + the item's training purchases), one learned scalar w (zero at the start). The
        # gated BPR gives this expert only purchases of items new to the shopper (236 of
        # RetailRocket's 7,377): too few to learn a bias per item, enough for one weight. w learns
        # only from those purchases against new negatives (``_prior_loss``): under the gated BPR
        # every visited purchase pushes its negatives' unvisited scores down, popular ones most, and
        # there w came out negative (bench/README.md).
        self.pop_weight = None
        if c.popularity_prior:
            counts = np.asarray(purchases.sum(0)).ravel()
            self.register_buffer("log_popularity", torch.from_numpy(np.log1p(counts)).float())
            self.pop_weight = nn.Parameter(torch.zeros(()))
        self._reg_params = [
            t
            for expert, params in (("visited", self.V), ("unvisited", self.U))
            if expert in c.reg_experts
            for t in (params.glob, params.loc)
        ]

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._graphs = {k: fn(v) for k, v in self._graphs.items()}
        return out

    # -- propagation ---------------------------------------------------------------------------
    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[: self.n_users], x[self.n_users :]

    def propagate_all(self) -> dict[str, torch.Tensor]:
        """Every propagation a step needs, once. Keys: ``{V,U}_glob``, ``{V,U}_loc``,
        ``{V,U}_b:<behaviour>`` (per-behaviour local outputs), ``V_view`` (E(V)), ``U_view`` (E(R))."""
        d = self.dim
        out: dict[str, torch.Tensor] = {}
        both = propagate(self._graphs["union"], torch.cat([self.V.glob, self.U.glob], 1), self.layers)
        out["V_glob"], out["U_glob"] = both[:, :d], both[:, d:]
        loc_v, loc_u = 0.0, 0.0
        for b in self.behaviors:
            both = propagate(self._graphs[f"b:{b}"], torch.cat([self.V.loc, self.U.loc], 1), self.layers)
            out[f"V_b:{b}"], out[f"U_b:{b}"] = both[:, :d], both[:, d:]
            loc_v = loc_v + out[f"V_b:{b}"]
            loc_u = loc_u + out[f"U_b:{b}"]
        out["V_loc"], out["U_loc"] = loc_v / len(self.behaviors), loc_u / len(self.behaviors)
        if self.training:
            out["V_view"] = propagate(self._graphs["E_V"], self.V.loc, self.layers)
            out["U_view"] = propagate(self._graphs["E_R"], self.U.glob, self.layers)
        return out

    def expert_reps(self, out: dict[str, torch.Tensor], expert: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(user reps, item reps) whose dot product is the expert's score s_ui (Eq. 4)."""
        key = "V" if expert == "visited" else "U"
        lam = self.lam[expert]
        u_g, i_g = self._split(out[f"{key}_glob"])
        u_l, i_l = self._split(out[f"{key}_loc"])
        return torch.cat([lam * u_g, (1 - lam) * u_l], 1), torch.cat([i_g, i_l], 1)

    # -- training ------------------------------------------------------------------------------
    def batches(self, rng: np.random.Generator, batch_size: int):
        # The softmax loss draws its own shared negatives and ignores the batch's: the generator
        # always draws some, so the softmax asks it for the cheapest (one uniform per purchase).
        softmax = self.cfg.rank_loss == "softmax"
        return bpr_triplets(
            self._purchases,
            rng,
            batch_size,
            self.device,
            hard=self._visited,
            hard_fraction=0.0 if softmax else self.cfg.visited_negatives,
            negatives=1 if softmax else self.cfg.negatives,
            candidates=1 if softmax else self.cfg.negative_candidates,
        )

    def _gated_pair_scores(self, out, users, items) -> torch.Tensor:
        vu, vi = self.expert_reps(out, "visited")
        uu, ui = self.expert_reps(out, "unvisited")
        s_v = (vu[users] * vi[items]).sum(1) + self.funnel_bias(users, items)
        s_u = (uu[users] * ui[items]).sum(1) + self.unvisited_bias(items)
        return torch.where(self.is_visited(users, items), s_v, s_u)

    def _gated_block_scores(self, out, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, M) gated scores of every user of ``users`` against every item of ``items`` (distinct):
        the visited expert where the pair is in the user's visited set, else the unvisited one."""
        vu, vi = self.expert_reps(out, "visited")
        uu, ui = self.expert_reps(out, "unvisited")
        u_np, i_np = users.cpu().numpy(), items.cpu().numpy()
        s_v = vu[users] @ vi[items].T
        if self.funnel is not None:
            s_v = s_v + self._funnel_weights(pair_block(self._funnel_csr, u_np, i_np))
        s_u = uu[users] @ ui[items].T + self.unvisited_bias(items)
        visited = torch.from_numpy(pair_block(self._visited, u_np, i_np) > 0).to(s_v.device)
        return torch.where(visited, s_v, s_u)

    def _softmax_rank_loss(
        self, out, users: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled softmax over each purchase and ``softmax_negatives`` items drawn uniformly once
        per step and shared by the batch (a draw equal to the row's purchase is masked); returns
        the loss and the drawn items."""
        c = self.cfg
        m = min(c.softmax_negatives, self.n_items)
        drawn = torch.from_numpy(self._softmax_rng.choice(self.n_items, m, replace=False)).to(pos.device)
        neg = self._gated_block_scores(out, users, drawn)
        neg = neg.masked_fill(drawn.unsqueeze(0) == pos.unsqueeze(1), float("-inf"))
        logits = (
            torch.cat([self._gated_pair_scores(out, users, pos).unsqueeze(1), neg], 1) / c.softmax_temperature
        )
        target = torch.zeros(len(users), dtype=torch.long, device=pos.device)
        return F.cross_entropy(logits, target), drawn

    def unvisited_bias(self, items: torch.Tensor) -> torch.Tensor | float:
        """The unvisited expert's item terms of ``items``: its item bias and popularity prior (0
        with neither)."""
        out = 0.0 if self.item_bias is None else self.item_bias[items]
        if self.pop_weight is not None:
            out = out + self.pop_weight.detach() * self.log_popularity[items]
        return out

    def _prior_loss(self, out, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """BPR of the unvisited expert's score over the batch's purchases of items new to the
        shopper against its negatives new to them too, the ranking the expert does at serving; only
        the prior's weight learns from it (the dot products are held fixed)."""
        # (B,) or (B, slots) per purchase; the softmax loss's (M,) draw is shared by every row
        shared = len(neg) != len(users)
        negs = neg.unsqueeze(0).expand(len(users), -1) if shared else neg.reshape(len(users), -1)
        k = negs.shape[1]
        keep = (~self.is_visited(users, pos)).unsqueeze(1) & ~self.is_visited(
            users.repeat_interleave(k), negs.reshape(-1)
        ).view(len(users), k)
        if not keep.any():
            return self.pop_weight * 0.0
        uu, ui = self.expert_reps(out, "unvisited")
        with torch.no_grad():
            d_pos = (uu[users] * ui[pos]).sum(1, keepdim=True)
            d_neg = (uu[users].unsqueeze(1) * ui[negs]).sum(2)
        lp, w = self.log_popularity, self.pop_weight
        return -F.logsigmoid((d_pos + w * lp[pos].unsqueeze(1)) - (d_neg + w * lp[negs]))[keep].mean()

    def _unvisited_item_terms(self) -> torch.Tensor | None:
        """(n_items,) the unvisited expert's item terms of every item, for scoring (None with neither)."""
        if self.item_bias is None and self.pop_weight is None:
            return None
        with torch.no_grad():
            return self.unvisited_bias(torch.arange(self.n_items, device=self.U.glob.device))

    def funnel_bias(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor | float:
        """(P,) the visited expert's funnel bias of each pair: the sum of the learned weights of the
        auxiliary behaviours the user showed on the item (0 for an item the user never touched)."""
        if self.funnel is None:
            return 0.0
        return self._funnel_weights(self._funnel_codes.lookup(users.cpu().numpy(), items.cpu().numpy()))

    def _funnel_weights(self, codes: np.ndarray) -> torch.Tensor:
        """Behaviour-bit codes (any shape) -> the sum of the learned weights of their set bits."""
        bits = (codes[..., None] >> np.arange(len(self._funnel_behaviors))) & 1
        return torch.from_numpy(bits.astype(np.float32)).to(self.funnel.device) @ self.funnel

    def pick_negatives(
        self, out: dict[str, torch.Tensor], users: torch.Tensor, neg: torch.Tensor
    ) -> torch.Tensor:
        """The negatives BPR uses, (B,) or (B, negatives). With ``negative_candidates`` > 1, ``neg``
        is (B, negatives, candidates) and each slot keeps its highest-scored candidate (dynamic
        negative sampling, Zhang et al. SIGIR'13): once the model separates random items they give
        BPR almost no gradient, and the hard ones are what is left to learn. A slot's candidates all
        come from one pool, so the share of visited-set negatives stays ``visited_negatives``."""
        if neg.dim() < 3:
            return neg
        b, slots, c = neg.shape
        with torch.no_grad():  # ranking the candidates needs no gradient
            best = self._pair_scores(out, users, neg.reshape(b, slots * c)).view(b, slots, c).argmax(2)
        neg = neg.gather(2, best.unsqueeze(2)).squeeze(2)
        return neg.squeeze(1) if slots == 1 else neg

    def _pair_scores(
        self, out: dict[str, torch.Tensor], users: torch.Tensor, items: torch.Tensor
    ) -> torch.Tensor:
        """Gated scores of ``users`` (B,) against ``items`` (B,) or (B, n)."""
        flat_users = users.unsqueeze(1).expand_as(items).reshape(-1) if items.dim() == 2 else users
        return self._gated_pair_scores(out, flat_users, items.reshape(-1)).view(items.shape)

    def _generative(self, out: dict[str, torch.Tensor], n_pos: int) -> torch.Tensor:
        """Behaviour n's local embeddings (unvisited expert) predict the edges of earlier behaviour m."""
        losses = []
        neg_per_pos = self.cfg.gen_negatives
        for m, n in self._gen_pairs:
            edges = self._edges[m]
            if edges.nnz == 0:
                continue
            pick = self._gen_rng.integers(0, edges.nnz, n_pos)
            pu = torch.from_numpy(edges.row[pick].astype(np.int64)).to(self.device)
            pi = torch.from_numpy(edges.col[pick].astype(np.int64)).to(self.device)
            nu = torch.from_numpy(self._gen_rng.integers(0, self.n_users, n_pos * neg_per_pos)).to(
                self.device
            )
            ni = torch.from_numpy(self._gen_rng.integers(0, self.n_items, n_pos * neg_per_pos)).to(
                self.device
            )
            users, items = self._split(out[f"U_b:{n}"])
            logits = torch.cat([(users[pu] * items[pi]).sum(1), (users[nu] * items[ni]).sum(1)])
            labels = torch.cat([torch.ones(len(pu)), torch.zeros(len(nu))]).to(self.device)
            losses.append(F.binary_cross_entropy_with_logits(logits, labels))
        return torch.stack(losses).mean() if losses else torch.zeros((), device=self.device)

    def _cl_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """At most ``cl_rows`` of the batch's users or items for InfoNCE (its cost is quadratic in rows)."""
        k = self.cfg.cl_rows
        if len(rows) <= k:
            return rows
        return rows[torch.randperm(len(rows), device=rows.device)[:k]]

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.cfg
        out = self.propagate_all()
        u, p, n = batch["users"], batch["pos"], batch["neg"]
        if c.rank_loss == "softmax":
            rank, n = self._softmax_rank_loss(out, u, p)
        else:
            n = self.pick_negatives(out, u, n)
            rank = bpr_loss(self._gated_pair_scores(out, u, p), self._pair_scores(out, u, n))

        cl_users = self._cl_rows(torch.unique(u))
        cl_items = self._cl_rows(torch.unique(p)) + self.n_users
        v_loc, v_view = out["V_loc"], out["V_view"]
        l_v_cl = 0.5 * (
            info_nce(v_loc[cl_users], v_view[cl_users], c.tau_visited)
            + info_nce(v_loc[cl_items], v_view[cl_items], c.tau_visited)
        )
        u_glob, u_view = out["U_glob"], out["U_view"]
        l_u_cl = 0.5 * (
            info_nce(u_glob[cl_users], u_view[cl_users], c.tau_unvisited)
            + info_nce(u_glob[cl_items], u_view[cl_items], c.tau_unvisited)
        )
        l_gen = self._generative(out, c.gen_positives)

        rows = torch.cat([u, p + self.n_users, n.reshape(-1) + self.n_users])
        reg = sum(t[rows].pow(2).sum() for t in self._reg_params) * c.reg / len(u)
        if self.item_bias is not None and "unvisited" in c.reg_experts:
            reg = reg + self.item_bias[rows[len(u) :] - self.n_users].pow(2).sum() * c.reg / len(u)
        total = rank + c.gamma_visited_cl * l_v_cl + c.gamma_unvisited_cl * l_u_cl
        total = total + c.gamma_generative * l_gen + reg
        extra = {}
        if self.pop_weight is not None:
            extra["popularity_prior"] = self._prior_loss(out, u, p, n)
            total = total + extra["popularity_prior"]
        return {
            **extra,
            "loss": total,
            c.rank_loss: rank,
            "visited_cl": l_v_cl,
            "unvisited_cl": l_u_cl,
            "generative": l_gen,
            "reg": reg,
        }

    # -- scoring -------------------------------------------------------------------------------
    def _reps(self):
        if self._cache is None or self.training:
            with torch.no_grad():
                out = self.propagate_all()
                self._cache = (*self.expert_reps(out, "visited"), *self.expert_reps(out, "unvisited"))
        return self._cache

    @staticmethod
    def _visited_entries(context: Context, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of the context, item indices) of every visited item of the context's users."""
        vis = context.visited.tocoo()
        keep = vis.data > 0
        rows = torch.as_tensor(vis.row[keep], dtype=torch.long, device=device)
        return rows, torch.as_tensor(vis.col[keep], dtype=torch.long, device=device)

    def expert_scores(self, context: Context) -> dict[str, torch.Tensor]:
        """(B, n_items) scores of each expert, before gating (the visited expert's with its funnel
        bias on the user's visited items)."""
        vu, vi, uu, ui = self._reps()
        users = context.users.clamp(min=0)
        visited = vu[users] @ vi.T
        if self.funnel is not None:
            rows, cols = self._visited_entries(context, visited.device)
            with torch.no_grad():
                visited[rows, cols] += self.funnel_bias(users[rows], cols).to(visited.dtype)
        unvisited = uu[users] @ ui.T
        if (terms := self._unvisited_item_terms()) is not None:
            unvisited = unvisited + terms
        return {"visited": visited, "unvisited": unvisited}

    def scores(self, context: Context) -> torch.Tensor:
        """The unvisited expert everywhere, then the visited expert's dot products written over the
        context's visited items only: one dense matmul instead of two and no dense visited mask.

        The gate reads the visited set of the context (as of the scoring date), not of training.
        The funnel bias reads which behaviours the user showed on the item *in training*: an item
        visited since then is scored by the visited expert without it."""
        vu, vi, uu, ui = self._reps()
        users = context.users.clamp(min=0)
        out = uu[users] @ ui.T
        if (terms := self._unvisited_item_terms()) is not None:
            out = out + terms
        rows, cols = self._visited_entries(context, out.device)
        if len(rows):
            with torch.no_grad():
                bias = self.funnel_bias(users[rows], cols)
            out[rows, cols] = ((vu[users[rows]] * vi[cols]).sum(-1) + bias).to(out.dtype)
        return out

    def explain(self, context: Context, rows: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        vis = context_visited(context, rows, items)
        return {"visited": vis, "w_visited": vis.float(), "w_unvisited": (~vis).float()}


def visit_filtered_edges(purchases: sp.csr_matrix, visited: sp.csr_matrix) -> sp.csr_matrix:
    """E(V): purchases whose item is in the user's visited set."""
    out = purchases.multiply(visited).tocsr()
    out.eliminate_zeros()
    return out
