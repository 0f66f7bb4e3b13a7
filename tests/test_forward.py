"""The forward machinery the attacker relies on: reused prefixes, early stops, column alignment, answer masks."""

import pytest
import torch

from benchmark.attacks import AttackConfig, build_attack

from benchmark.attacks.base import attacked_positions

from benchmark.attacks.soft_suffix import suffix_start, with_suffix

from benchmark.modeling.forward import (add, capture, compose, defense_edits, input_embeddings, prefill, run_continued,
                                        run_edited)
from benchmark.modeling.base_residuals import BaseResiduals
from benchmark.running.engine import behavior_scores, shared_prefix
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


def test_the_unembedding_gets_the_read_positions_as_one_contiguous_block(tiny_model, ioi):
    """A strided slice of the read positions made torch run one product per row, each reading the whole
    unembedding; the model's pre-hook hands it a contiguous block, with the same logits."""
    batch = _batch(ioi)
    batch.read_len = 2
    contiguous = []
    head = tiny_model.hf.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: contiguous.append(args[0].is_contiguous()))
    try:
        logits = run_edited(tiny_model, batch, {})
    finally:
        hook.remove()
    assert contiguous == [True]
    assert torch.allclose(logits, run_edited(tiny_model, batch, {}, all_logits=True)[:, -2:], atol=1e-5)


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


@pytest.mark.parametrize("read_layer", [None, 2])
def test_a_prefilled_prompt_continued_equals_the_full_pass(tiny_model, ioi, fitted_clamp, read_layer):
    """What the soft suffix attack relies on: the prompt before the suffix run once, then only the suffix columns
    with its keys and values, gives the full pass's read, site inputs (every column) and gradient, also for a
    subset of the rows that drops their common padding."""
    ext = with_suffix(_batch(ioi, 8), 3, 5)
    start = suffix_start(ext, 3)
    head = PromptBatch(ext.ids, ext.input_ids[:, :start], ext.attention_mask[:, :start])
    embed = input_embeddings(tiny_model).detach()
    pre = prefill(tiny_model, head, defense_edits(fitted_clamp, head), read_layer=read_layer,
                  inputs_embeds=embed[head.input_ids])
    rows = torch.tensor([1, 4, 6])
    sub = ext.select(rows)
    drop = ext.input_ids.shape[1] - sub.input_ids.shape[1]
    assert drop > 0, "the rows share leading padding, which the sub-batch and its prefill drop"
    results = []
    for continued in (False, True):
        delta = (0.1 * torch.ones(len(rows), 3, embed.shape[1])).requires_grad_(True)
        embeds = embed[sub.input_ids]
        embeds = torch.cat([embeds[:, :start - drop], embeds[:, start - drop:] + delta], 1)
        seen = {}
        edits = {L: compose(capture(seen, L), e) for L, e in defense_edits(fitted_clamp, sub).items()}
        if continued:
            read = run_continued(tiny_model, sub, edits, pre.select(rows, drop), read_layer=read_layer,
                                 inputs_embeds=embeds[:, start - drop:])
        else:
            read = run_edited(tiny_model, sub, edits, read_layer=read_layer, inputs_embeds=embeds)
        read.pow(2).sum().backward()
        results.append((read.detach(), seen[2].detach(), delta.grad))
    (full, full_site, full_grad), (cont, cont_site, cont_grad) = results
    assert cont.shape == full.shape and cont_site.shape == full_site.shape
    assert torch.allclose(cont, full, atol=1e-4, rtol=1e-4)
    assert torch.allclose(cont_site, full_site, atol=1e-4, rtol=1e-4)
    assert torch.allclose(cont_grad, full_grad, atol=1e-3, rtol=1e-3) and full_grad.abs().sum() > 0


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
        runs[patience] = build_attack(tiny_model, fitted_clamp, ioi, cfg).run(flips, progress=False)
    assert all(not o.recovered and o.steps_used == 24 for o in runs[None])
    assert all(not o.recovered and o.steps_used < 24 for o in runs[2])
