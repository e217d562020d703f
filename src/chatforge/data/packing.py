"""Sample packing for SFT and PTX rows.

Rows are packed greedily in their (shuffled) order: a row joins the current pack while the pack stays
within max_length tokens, else it starts a new pack. No token is dropped or altered, except that the
label of each row's first token becomes -100.

How packed rows stay isolated:
  * loss: a causal LM predicts token t+1 from position t, so the only loss term that could cross a
    boundary is "first token of row k+1 given row k"; its label is -100, so the loss never does.
  * attention: `position_ids` restart at 0 at each row. Passed with attention_mask=None and
    use_cache=False (see `collate.model_inputs`), transformers' masking_utils (sdpa, eager, flex and
    flash kernels) builds a block-diagonal causal mask from the restarts, so no row attends to
    another. Tested against each row run alone on a tiny Llama.
"""

from __future__ import annotations

from .tokenize import IGNORE_INDEX


def pack_rows(batch: dict[str, list], max_length: int) -> dict[str, list]:
    """Batched map function: rows {input_ids (T_i,), labels (T_i,)} -> packs {input_ids, labels,
    position_ids} of at most max_length tokens each."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    pack: dict[str, list] = {k: [] for k in out}
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        if pack["input_ids"] and len(pack["input_ids"]) + len(ids) > max_length:
            _flush(pack, out)
        pack["input_ids"] += ids
        pack["labels"] += [IGNORE_INDEX, *labels[1:]]
        pack["position_ids"] += range(len(ids))
    _flush(pack, out)
    return out


def _flush(pack: dict[str, list], out: dict[str, list]) -> None:
    if pack["input_ids"]:
        for k, v in pack.items():
            out[k].append(list(v))
            v.clear()
