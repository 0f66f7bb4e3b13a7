"""The forward machinery the attacker relies on: reused prefixes, early stops, column alignment, answer masks."""

import pytest
import torch

from benchmark.attack import AttackConfig, RecoveryAttack, attacked_positions, suffix_start, with_suffix
from benchmark.base_residuals import BaseResiduals
from benchmark.engine import behavior_scores, shared_prefix
from benchmark.forward import add, capture, run_edited
from tasks.base import PromptBatch


def _batch(ioi, n=6):
    return ioi.encode(ioi.examples("test")[:n])


def test_reused_prefix_gives_the_same_logits_and_gradient(tiny_model, ioi):
    batch = _batch(ioi)
    seen = {}
    run_edited(tiny_model, batch, {1: capture(seen, 1)})
    h = seen[1].detach()
    grads = []
    for prefix in (None, (1, h)):
        delta = torch.zeros_like(h, requires_grad=True)
        logits = run_edited(tiny_model, batch, {1: add(delta)}, prefix=prefix)
        ioi.behavior(logits, batch).sum().backward()
        grads.append((logits.detach(), delta.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5)
    assert grads[0][1].abs().sum() > 0


def test_reused_prefix_does_not_run_the_blocks_below(tiny_model, ioi):
    batch = _batch(ioi)
    seen = {}
    run_edited(tiny_model, batch, {2: capture(seen, 2)})
    calls = []
    hook = tiny_model.hf.model.layers[0].mlp.register_forward_hook(lambda *a: calls.append(1))  # inside the block
    try:
        run_edited(tiny_model, batch, {}, prefix=(2, seen[2]))
    finally:
        hook.remove()
    assert calls == []


def test_base_residuals_match_a_fresh_forward_whatever_the_chunk(tiny_model, ioi):
    batch = _batch(ioi, n=8)
    store = BaseResiduals(tiny_model, 2)
    store.get(batch.select([5, 1, 6]))  # computed in another batch, with other padding
    assert len(store) == 3
    got = store.get(batch)
    assert len(store) == 8  # the other five ran once, the three stored ones did not
    fresh = run_edited(tiny_model, batch, {}, read_layer=2)
    real = batch.attention_mask.bool()
    assert torch.allclose(got[real], fresh[real], atol=1e-5)
    assert got[~real].abs().sum() == 0


def test_scores_from_the_shared_prefix_equal_full_passes(tiny_model, ioi, fitted_clamp):
    batch = _batch(ioi, n=8)
    store = shared_prefix(tiny_model, ioi, fitted_clamp)
    assert store is not None and store.layer == min(fitted_clamp.sites)
    for defense in (None, fitted_clamp):
        full = behavior_scores(tiny_model, ioi, batch, defense)
        shared = behavior_scores(tiny_model, ioi, batch, defense, chunk=3, residuals=store)
        assert torch.allclose(full, shared, atol=1e-4)
    assert not torch.allclose(behavior_scores(tiny_model, ioi, batch, None),
                              behavior_scores(tiny_model, ioi, batch, fitted_clamp))


def test_edit_below_a_reused_prefix_is_refused(tiny_model, ioi):
    batch = _batch(ioi)
    h = torch.zeros(*batch.input_ids.shape, 64)
    with pytest.raises(ValueError, match="below the reused prefix"):
        run_edited(tiny_model, batch, {0: add(1.0)}, prefix=(2, h))


def test_read_layer_returns_the_residual_and_stops_there(tiny_model, ioi):
    batch = _batch(ioi)
    seen = {}
    run_edited(tiny_model, batch, {1: capture(seen, 1)})
    calls = []
    hook = tiny_model.hf.model.layers[3].mlp.register_forward_hook(lambda *a: calls.append(1))
    try:
        read = run_edited(tiny_model, batch, {}, read_layer=1)
    finally:
        hook.remove()
    assert torch.allclose(read, seen[1], atol=1e-6)
    assert calls == [], "blocks above the read layer must not run"


def test_logits_are_read_at_the_last_read_len_positions(tiny_model, ioi):
    batch = _batch(ioi)
    full = run_edited(tiny_model, batch, {}, all_logits=True)
    batch.read_len = 3
    assert torch.allclose(run_edited(tiny_model, batch, {}), full[:, -3:], atol=1e-5)


def test_add_aligns_columns_from_the_left():
    t = torch.arange(6.0).view(1, 3, 2)
    assert torch.equal(add(t)(torch.zeros(1, 2, 2)), t[:, :2])
    wider = add(t)(torch.zeros(1, 5, 2))
    assert torch.equal(wider[:, :3], t) and wider[:, 3:].abs().sum() == 0


def test_length_chunks_trim_padding_and_map_back_to_row_order():
    lengths = [5, 2, 7, 2, 4]
    width = max(lengths)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    batch = PromptBatch([str(i) for i in range(5)], torch.arange(5)[:, None].expand(5, width) * mask, mask, {})
    parts = list(batch.length_chunks(2))
    assert [p.ids for p in parts] == [["1", "3"], ["4", "0"], ["2"]], "shortest first, ties in row order"
    assert [p.input_ids.shape[1] for p in parts] == [2, 5, 7], "columns of padding for every row are dropped"
    widths = batch.map_length_chunks(2, lambda p: torch.tensor([[int(i), p.input_ids.shape[1]] for i in p.ids]))
    assert widths.tolist() == [[0, 5], [1, 2], [2, 7], [3, 2], [4, 5]], "rows come back in the batch's order"


def _answer_batch():
    ids = torch.tensor([[0, 5, 6, 7, 8, 9], [4, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return PromptBatch(["a", "b"], ids, mask, {}, read_len=3)  # the last 2 tokens are a teacher-forced answer


def test_attacker_never_edits_teacher_forced_answer_tokens():
    batch = _answer_batch()
    pos = attacked_positions(batch, "all")
    assert pos[:, -2:].sum() == 0 and pos[1, 1:4].all() and pos[0, :2].sum() == 0  # padding and sink excluded
    last = attacked_positions(batch, "last")
    assert last.sum(1).tolist() == [1.0, 1.0] and last[:, 3].all()


def test_suffix_goes_between_prompt_and_teacher_forced_answer():
    batch = _answer_batch()
    ext = with_suffix(batch, 2, 99)
    assert ext.input_ids[1].tolist() == [4, 5, 6, 7, 99, 99, 8, 9]
    assert suffix_start(ext, 2) == 4 and ext.read_len == 3


def test_patience_leaves_stalled_budgets_early(tiny_model, ioi, fitted_clamp):
    batch = ioi.encode(ioi.examples("test"))
    valid = (behavior_scores(tiny_model, ioi, batch, None) > 0) & (behavior_scores(tiny_model, ioi, batch, fitted_clamp) <= 0)
    flips = batch.select(valid.nonzero()[:4, 0])
    runs = {}
    for patience in (None, 2):
        cfg = AttackConfig(eps=(1e-7, 2e-7), steps=12, patience=patience)  # budgets far too small to recover
        runs[patience] = RecoveryAttack(tiny_model, fitted_clamp, ioi, cfg).run(flips, progress=False)
    assert all(not o.recovered and o.steps_used == 24 for o in runs[None])
    assert all(not o.recovered and o.steps_used < 24 for o in runs[2])
