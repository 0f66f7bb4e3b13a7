"""GPU memory of the attack on Gemma-2-2B at batch 16 on IOI in bfloat16, estimated without a GPU or the weights.

Run from the repository root:

    .venv/bin/python scripts/gpu_memory_estimate.py

It builds Gemma-2-2B's architecture from its published config (``GEMMA_2_2B``, the values of
https://huggingface.co/google/gemma-2-2b/blob/main/config.json) on PyTorch's ``meta`` device, where tensors have
shapes and dtypes but no storage, and adds up what a GPU would hold during the two largest stages of a run:

- **attack step**: the weights in bfloat16, the Gemma Scope SAE at the default site in float32 (16k latents), and
  every tensor autograd saves for the backward pass of one attack step: ``delta`` added at the site in float32, the
  residual handed back in bfloat16, every block above the site, the final norm and the unembedding at the read
  position (counted with ``torch.autograd.graph.saved_tensors_hooks``; tensors shaped like a weight are the weight
  itself, already counted, and are left out);
- **side effect**: the next-token KL pass over a chunk of 16 control texts, which holds full-vocabulary logits at
  every position: base and defended log-probabilities and the probabilities, float32 (the weights again).

Prompt lengths are the default model's tokenizer's (IOI's longest test prompt, the control texts' padded width);
Gemma's tokenizer gives English text a similar number of tokens. The result goes into the memory section of
``leaderboard/perf.md`` and ``leaderboard/perf.json``. It leaves out the allocator's slack and CUDA's context (a
few hundred MiB); the margin it states covers them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmark.modeling.models import DEFAULT_MODEL, load_model  # noqa: E402
from scripts.perf_benchmark import table, update_section  # noqa: E402
from tasks import TASKS  # noqa: E402

GEMMA_2_2B = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256, vocab_size=256000)
SITE, SAE_WIDTH, BATCH, KL_CHUNK, BUDGET_GIB = 12, 16384, 16, 16, 24
MEMORY_HEADER = "## GPU memory of Gemma-2-2B's attack (estimate)"
MIB = 2**20


def meta_gemma():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    with torch.device("meta"):
        model = Gemma2ForCausalLM(Gemma2Config(**GEMMA_2_2B)).to(torch.bfloat16)
    return model.requires_grad_(False)


def attack_step_saved_bytes(model, batch: int, tokens: int) -> int:
    """Bytes autograd saves for one attack step's backward: ``delta`` at block ``SITE`` through the blocks above."""
    weights = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape[::-1]) for p in model.parameters()}
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape) not in weights:
            saved[0] += t.numel() * t.element_size()
        return t

    d = GEMMA_2_2B["hidden_size"]
    delta = torch.zeros(batch, tokens, d, device="meta", requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = (torch.zeros(batch, tokens, d, device="meta") + delta).to(torch.bfloat16)
        positions = torch.arange(tokens, device="meta")[None].expand(batch, -1)
        rotary = model.model.rotary_emb(h, positions)
        for block in model.model.layers[SITE + 1:]:
            h = block(h, position_embeddings=rotary, attention_mask=None, position_ids=positions)
            h = h[0] if isinstance(h, tuple) else h
        model.lm_head(model.model.norm(h[:, -1:])).float().log_softmax(-1)
    return saved[0]


def prompt_lengths() -> tuple[int, int]:
    model = load_model(DEFAULT_MODEL)
    ioi = TASKS.get("ioi")(model.tokenizer)
    return int(ioi.encode(ioi.examples("test")).input_ids.shape[1]), int(ioi.control_batch().input_ids.shape[1])


def estimate() -> dict:
    model = meta_gemma()
    ioi_tokens, control_tokens = prompt_lengths()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    d = GEMMA_2_2B["hidden_size"]
    sae = (2 * d * SAE_WIDTH + SAE_WIDTH * 2 + d) * 4  # W_enc, W_dec, b_enc, threshold, b_dec in float32
    saved = attack_step_saved_bytes(model, BATCH, ioi_tokens)
    kl = 3 * KL_CHUNK * control_tokens * GEMMA_2_2B["vocab_size"] * 4
    attack, side = weights + sae + saved, weights + sae + kl
    return {"rows": [
        {"stage": "attack step", "batch": BATCH, "tokens": ioi_tokens, "weights_mib": weights / MIB,
         "sae_mib": sae / MIB, "activations_mib": saved / MIB, "total_gib": attack / 2**30},
        {"stage": "side effect (KL)", "batch": KL_CHUNK, "tokens": control_tokens, "weights_mib": weights / MIB,
         "sae_mib": sae / MIB, "activations_mib": kl / MIB, "total_gib": side / 2**30},
    ], "peak_gib": max(attack, side) / 2**30}


def main() -> None:
    est = estimate()
    lines = [MEMORY_HEADER, "",
             "Estimated by `scripts/gpu_memory_estimate.py` (how: its docstring): Gemma-2-2B's architecture built "
             "from its published config on PyTorch's meta device (shapes, no storage), bfloat16 weights, the 16k "
             "Gemma Scope SAE in float32, and the bytes autograd saves for one attack step at IOI's prompt length, "
             f"against the largest other stage. Budget: {BUDGET_GIB} GiB.", "",
             table(est["rows"], ["stage", "batch", "tokens", "weights_mib", "sae_mib", "activations_mib",
                                 "total_gib"]), "",
             f"Peak: {est['peak_gib']:.1f} GiB of {BUDGET_GIB} GiB "
             f"({'fits' if est['peak_gib'] < BUDGET_GIB else 'does not fit'}, before the allocator's slack and "
             "CUDA's context, a few hundred MiB).", ""]
    update_section(ROOT / "leaderboard", MEMORY_HEADER, lines, {"gemma2_2b_attack_peak_gib_estimate": est["peak_gib"]})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
