"""LightGCN building blocks: normalised bipartite adjacency and sparse propagation.

The adjacency of a user-item graph is the symmetric ``D^-1/2 A D^-1/2`` over ``n_users + n_items``
nodes, stored as a torch sparse CSR tensor; nothing dense in users x items is ever built. Because it
is symmetric, the backward pass of ``A @ x`` is ``A @ grad``, which ``SymmetricSpMM`` uses instead of
torch's generic sparse backward (about 3x faster on the Tmall graphs, see ``../shared/notes/perf.md``).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn


def normalized_adjacency(interactions: sp.csr_matrix, device: torch.device | str = "cpu") -> torch.Tensor:
    """Symmetric normalised adjacency of the bipartite graph of a users x items 0/1 matrix.

    Args:
        interactions: (n_users, n_items) CSR; any non-zero is an edge.

    Returns:
        (n_users + n_items) square sparse CSR tensor, float32.
    """
    n_users, n_items = interactions.shape
    r = interactions.tocoo()
    rows = np.concatenate([r.row, r.col + n_users])
    cols = np.concatenate([r.col + n_users, r.row])
    n = n_users + n_items
    deg = np.bincount(rows, minlength=n).astype(np.float64)
    with np.errstate(divide="ignore"):
        inv_sqrt = np.where(deg > 0, deg**-0.5, 0.0)
    vals = (inv_sqrt[rows] * inv_sqrt[cols]).astype(np.float32)
    a = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
    a.sum_duplicates()
    a.sort_indices()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        t = torch.sparse_csr_tensor(
            torch.from_numpy(a.indptr.astype(np.int64)),
            torch.from_numpy(a.indices.astype(np.int64)),
            torch.from_numpy(a.data),
            size=(n, n),
            check_invariants=False,  # built from a canonical scipy CSR just above
        )
    return t.to(device)


class SymmetricSpMM(torch.autograd.Function):
    """``y = A @ x`` for a symmetric sparse ``A``; the gradient is ``A @ grad_y``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)  # sparse kernels want fp32
    def forward(ctx, adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adj = adj
        return adj @ x

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor):
        return None, ctx.adj @ grad


def propagate(adj: torch.Tensor, ego: torch.Tensor, layers: int) -> torch.Tensor:
    """LightGCN: the mean of layers 0..L of ``A^l @ ego``.

    Args:
        adj: normalised adjacency, (N, N) sparse.
        ego: (N, d) layer-0 embeddings (users first, then items).
        layers: L.
    """
    out = ego
    x = ego
    for _ in range(layers):
        x = SymmetricSpMM.apply(adj, x)
        out = out + x
    return out / (layers + 1)


class LightGCNEncoder(nn.Module):
    """Own user and item embeddings, propagated over one or more graphs.

    ``forward(adj)`` returns ``(users, items)`` of shape (n_users, d) and (n_items, d).
    """

    def __init__(self, n_users: int, n_items: int, dim: int, layers: int, init_std: float = 0.1):
        super().__init__()
        self.n_users, self.n_items, self.layers = n_users, n_items, layers
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        nn.init.normal_(self.user.weight, std=init_std)
        nn.init.normal_(self.item.weight, std=init_std)

    def ego(self) -> torch.Tensor:
        return torch.cat([self.user.weight, self.item.weight], 0)

    def forward(self, adj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = propagate(adj, self.ego(), self.layers)
        return out[: self.n_users], out[self.n_users :]
