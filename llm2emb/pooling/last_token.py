"""Last-token (EOS) pooling, as E5-mistral: the state of the appended EOS token.

The position is found from the mask, not from the sequence length, so left and right padding give the
same vector (a recurring bug in other tools).
"""

import torch

from llm2emb.pooling.base import Pooler


class LastTokenPooler(Pooler):
    name = "last_token"
    needs_eos = True

    def forward(self, hidden_states, pool_mask, all_layers=None):
        positions = torch.arange(pool_mask.shape[1], device=pool_mask.device)
        last = (positions * pool_mask.bool()).argmax(dim=1)
        return hidden_states[torch.arange(hidden_states.shape[0], device=last.device), last]
