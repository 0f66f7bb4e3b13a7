"""The undefended model's residual after one block, computed once per distinct prompt.

Nothing below a defense's first site changes when the defense is switched on, so every pass the engine makes over
the same prompts (base and defended scores, side effect, edit size, the suite's own metrics) can start from the
same residual instead of running the blocks below it again (``prefix`` of :func:`benchmark.modeling.forward.run_edited`).
Rows are stored by their real tokens, unpadded, so a prompt hits the store whatever batch or chunk it comes in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmark.modeling.forward import run_edited
from benchmark.modeling.models import LoadedModel
from tasks.base import PromptBatch


class BaseResiduals:
    """Residuals [n_i, d] after block ``layer`` of the undefended model, one per distinct token sequence."""

    def __init__(self, model: LoadedModel, layer: int) -> None:
        model.check_layer(layer)
        self.model, self.layer = model, layer
        self._rows: dict[bytes, Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    @staticmethod
    def _key(tokens: Tensor) -> bytes:
        return tokens.cpu().numpy().tobytes()

    @torch.no_grad()
    def get(self, batch: PromptBatch) -> Tensor:
        """[b, p, d]: the residual after block ``layer`` for every row of ``batch`` (zeros on its left padding);
        rows not seen before run once, together."""
        real = batch.attention_mask.bool()
        keys = [self._key(batch.input_ids[i][real[i]]) for i in range(len(batch))]
        missing = sorted({k: i for i, k in enumerate(keys) if k not in self._rows}.values())
        if missing:
            part = batch.select(missing)
            h = run_edited(self.model, part, {}, read_layer=self.layer)  # [m, p', d]
            part_real = part.attention_mask.bool()
            for j, i in enumerate(missing):
                self._rows[keys[i]] = h[j][part_real[j]].clone()
        first = self._rows[keys[0]]
        out = first.new_zeros(len(batch), batch.input_ids.shape[1], first.shape[-1])
        for i, k in enumerate(keys):
            out[i][real[i]] = self._rows[k]
        return out
