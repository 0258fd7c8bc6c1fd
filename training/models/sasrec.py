"""SASRec (Kang & McAuley, ICDM'18) as its strongest published variant builds it: causal and
padding masks, item + position (+ behaviour, time-gap and session-start) embeddings, output scores
tied to the input item embeddings, full-softmax cross-entropy over the catalogue (Klenitskiy &
Vasilev, RecSys'23; ``../shared/notes/sequence_models.md``). Everything it shares with FAME, and the
options (losses, targets, the repeat path), is in ``training.models.sequential``; its defaults and
why are in ``sasrec.yaml``.
"""

from __future__ import annotations

import torch
from torch import nn

from training.data import TrainingData
from training.models.sequential import SequenceEncoder, SequenceRecommender
from training.sequences import SequenceFeatures


class SASRec(SequenceRecommender):
    name = "sasrec"

    def __init__(self, data: TrainingData, config: dict):
        super().__init__(data, config)
        self.encoder = SequenceEncoder(self.n_items, self.cfg, self.cfg.layers)
        self.norm = nn.LayerNorm(self.cfg.dim)

    def head(self, f: SequenceFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = self.encoder(f)
        state = self.norm(x[:, -1])
        return state, state @ self.encoder.items.weight[1:].T
