"""Train a local model's reference SAEs offline, evaluate them, and write them in sae_lens format.

Rebuild the shipped SAEs with ``benchmark train-saes --model NAME`` (the defaults below are the ones used for the
default model's committed weights; each model's REPORT.md under ``saes/`` gives its exact command). Text comes from
the labelled sets of the ``sae-probes`` package (news, reviews, medical abstracts, science questions, code ...), a
share of it wrapped in the model's chat template as user prompts and question-answer turns (none for a model
without a chat template, such as a base model). Position 0 (the attention sink, residual norm ~24,000 against ~150
on the default model) is never used for training or statistics.

Architecture: BatchTopK during training, saved as JumpReLU for inference (sae_lens converts it), so each
latent has its own threshold and a clamp acts on one latent without the others' ranking. Decoder rows are
unit norm in the saved file, so a clamp value is in units of residual norm.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from benchmark.errors import BenchmarkError
from benchmark.files import write_json_atomic
from benchmark.modeling.data_sources import sae_probes_texts
from benchmark.modeling.models import DEFAULT_MODEL, LoadedModel, load_model

#: sae-probes sets mixed into the training text (diverse domains; no set shared with a held-out test split).
CORPUS_SETS = (
    "97_news_class", "161_agnews_0", "100_news_fake", "111_yelp_data", "113_movie_sent", "102_twt_emotion",
    "101_disease_class", "98_cancer_cat", "36_sciq_tf", "99_sci_cat", "55_open_qa", "86_social_iqa",
    "103_it_tick", "158_code_C", "159_code_Python", "160_code_HTML", "87_glue_cola", "90_glue_qnli",
    "92_glue_sst2", "41_truthqa_tf", "54_cs_tf", "94_ai_gen", "126_art_type_book", "108_athlete_sport",
)


@dataclass
class TrainConfig:
    layers: tuple[int, ...] = (8, 12, 16)  # the default model's; ``train-saes --model`` takes the model's own
    d_sae: int = 4608
    k: int = 64
    train_tokens: int = 400_000
    heldout_tokens: int = 20_000
    steps: int = 2500
    batch_size: int = 1024
    lr: float = 4e-4
    max_seq_len: int = 128
    min_seq_len: int = 16
    chat_share: float = 0.35
    seed: int = 0
    #: train on residuals less their mean (folded back into the biases after): needed where a few dimensions carry a
    #: large constant (Gemma 3: most of the residual's squared norm), which otherwise makes a few latents fire on every
    #: token and the rest die; off for the default model's committed SAEs, which were trained without it
    center: bool = False


def build_corpus(tokenizer, cfg: TrainConfig) -> list[list[int]]:
    """Token id lists: plain texts and chat-formatted turns, shuffled with the config's seed."""
    rng = random.Random(cfg.seed)
    chat_share = cfg.chat_share if getattr(tokenizer, "chat_template", None) else 0.0
    texts: list[tuple[str, str]] = []  # (kind, text)
    for name in CORPUS_SETS:
        for text in sae_probes_texts(name):
            texts.append((name, text))
    rng.shuffle(texts)
    seqs: list[list[int]] = []
    budget = cfg.train_tokens + cfg.heldout_tokens
    total = 0
    for name, text in texts:
        if rng.random() < chat_share:
            if "\nA:" in text:  # question-answer sets become a two-turn chat
                q, a = text.split("\nA:", 1)
                msgs = [{"role": "user", "content": q.removeprefix("Q:").strip()},
                        {"role": "assistant", "content": a.strip()}]
            else:
                msgs = [{"role": "user", "content": text}]
            ids = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False)
            if not isinstance(ids, list):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        ids = ids[: cfg.max_seq_len]
        if len(ids) < cfg.min_seq_len:
            continue
        seqs.append(ids)
        total += len(ids) - 1  # position 0 is dropped
        if total >= budget:
            break
    return seqs


@torch.no_grad()
def collect_residuals(
    model: LoadedModel, seqs: list[list[int]], layers: tuple[int, ...], batch_tokens: int = 4096
) -> dict[int, torch.Tensor]:
    """Residual stream after each layer for every token but position 0: ``{layer: [n_tokens, d_model]}``, in float16
    where every value fits it (the default model), else in float32 (Gemma 3's residual has entries past float16's
    65,504).

    Sequences are batched by length (right padding, which a causal model ignores for earlier tokens) and the
    forward stops after the deepest requested layer.
    """
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    batches, cur = [], []
    for i in order:
        cur.append(i)
        if len(cur) * len(seqs[i]) >= batch_tokens:
            batches.append(cur)
            cur = []
    if cur:
        batches.append(cur)
    for batch in tqdm(batches, desc="collecting residuals"):
        width = max(len(seqs[i]) for i in batch)
        ids = torch.full((len(batch), width), model.tokenizer.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, : len(seqs[i])] = 1
        saved = []
        with model.lm.trace(dict(input_ids=ids, attention_mask=mask)) as tracer:
            for L in sorted(layers):  # nnsight reads values in forward order
                saved.append(model.block(L).output.save())
            tracer.stop()  # nothing after the deepest requested layer is needed
        keep = mask.bool().clone()
        keep[:, 0] = False
        for L, h in zip(sorted(layers), saved):
            out[L].append(h[keep])
    return {L: _compact(torch.cat(v)) for L, v in out.items()}


#: the largest magnitude stored in float16 (its own maximum is 65,504; a margin keeps rounding from reaching inf)
FLOAT16_LIMIT = 60_000.0


def _compact(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float16 where all of it fits, else unchanged (float32)."""
    return x.to(torch.float16) if x.abs().max() < FLOAT16_LIMIT else x


def _shuffled_batches(acts: torch.Tensor, batch_size: int, seed: int, offset: torch.Tensor | None = None):
    """Endless shuffled [batch_size, d_in] float32 batches of ``acts``, less ``offset`` where given."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(acts.shape[0], generator=gen)
        for i in range(0, acts.shape[0] - batch_size + 1, batch_size):
            batch = acts[perm[i : i + batch_size]].float()
            yield batch if offset is None else batch - offset


def train_one(acts: torch.Tensor, cfg: TrainConfig, d_in: int, layer: int, hook_name: str):
    """Train a BatchTopK SAE on ``acts`` [n, d_in]; returns the inference SAE (JumpReLU, unit-norm decoder)."""
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(cfg.seed + layer)
    sae_cfg = BatchTopKTrainingSAEConfig(
        d_in=d_in, d_sae=cfg.d_sae, k=cfg.k, normalize_activations="expected_average_only_in"
    )
    sae_cfg.metadata.hook_name = hook_name
    sae = BatchTopKTrainingSAE(sae_cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=cfg.steps // 20,
        lr_decay_steps=cfg.steps // 5,
        n_batches_for_norm_estimate=50,
        logger=LoggingConfig(log_to_wandb=False),
    )
    mean = acts.float().mean(0) if cfg.center else None
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae,
                         data_provider=_shuffled_batches(acts, cfg.batch_size, cfg.seed, mean))
    trainer.fit()
    tmp = Path(f"/tmp/sae-train-{layer}-{time.time_ns()}")
    sae.save_inference_model(tmp)
    trained = SAE.load_from_disk(tmp, device="cpu", dtype="float32")
    if mean is not None:
        uncenter(trained, mean)
    return trained


@torch.no_grad()
def uncenter(sae, mean: torch.Tensor) -> None:
    """Make an SAE trained on ``x - mean`` read and write ``x`` itself, exactly: the mean goes into the decoder bias
    (which the encoder subtracts first where ``apply_b_dec_to_input``, else the encoder bias absorbs it)."""
    if not sae.cfg.apply_b_dec_to_input:
        sae.b_enc -= mean @ sae.W_enc
    sae.b_dec += mean


@torch.no_grad()
def evaluate_sae(sae, model: LoadedModel, layer: int, heldout_acts: torch.Tensor, heldout_seqs) -> dict:
    """L0, FVU and dead-latent share on held-out activations, and next-token loss with the SAE spliced in."""
    x = heldout_acts.float()
    feats = sae.encode(x)
    recon = sae.decode(feats)
    l0 = (feats > 0).sum(-1).float().mean().item()
    fvu = ((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    dead = ((feats > 0).sum(0) == 0).float().mean().item()
    clean, spliced, zeroed = _next_token_losses(model, layer, sae, heldout_seqs)
    return {
        "l0": round(l0, 2),
        "fvu": round(fvu, 4),
        "dead_share": round(dead, 5),
        "loss_clean": round(clean, 4),
        "loss_spliced": round(spliced, 4),
        "loss_increase": round(spliced - clean, 4),
        "loss_zero_ablated": round(zeroed, 4),
        "loss_recovered_share": round((zeroed - spliced) / (zeroed - clean), 4),
    }


def _next_token_losses(model: LoadedModel, layer: int, sae, seqs) -> tuple[float, float, float]:
    """Mean next-token loss: clean, with resid_post of ``layer`` replaced by the SAE reconstruction, and zeroed.

    Position 0 is left untouched in both edits; loss is averaged over the same predicted tokens. Batches hold 16
    sequences at a 49k vocabulary, fewer at a larger one (Gemma 3's 262k logits are 1 MB per token).
    """
    batch = max(1, 16 * 49152 // model.hf.config.vocab_size)
    sums = torch.zeros(3)
    count = 0
    for i in range(0, len(seqs), batch):
        part = seqs[i : i + batch]
        width = max(map(len, part))
        ids = torch.full((len(part), width), model.tokenizer.pad_token_id)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for r, s in enumerate(part):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        target = ids[:, 1:]
        valid = mask[:, 1:].bool()
        for j, mode in enumerate(("clean", "sae", "zero")):
            with model.lm.trace(dict(input_ids=ids, attention_mask=mask)):
                if mode != "clean":
                    h = model.block(layer).output
                    new = sae(h) if mode == "sae" else torch.zeros_like(h)
                    new[:, 0] = h[:, 0]
                    model.block(layer).output = new
                logits = model.lm.output.logits.save()
            logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, target[..., None])[..., 0]
            sums[j] += -(logp[valid]).sum()
        count += int(valid.sum())
    clean, spliced, zeroed = (sums / count).tolist()
    return clean, spliced, zeroed


def train_reference_saes(out_dir: Path, cfg: TrainConfig, model_name: str = DEFAULT_MODEL, note: str = "") -> dict:
    """Collect activations once for all layers, train one SAE per layer, save its weights (float16 where they fit)
    and a report (with ``note``, why this budget, where given).

    A folder that already holds SAEs of the same model file keeps them: the new layers join its report as another
    run (its own config, note and times), so SAEs trained at different budgets sit side by side and the report says
    which run made each. Retraining a layer the folder has replaces it."""
    started = time.time()
    model = load_model(model_name, device="cpu")  # the trainer keeps its batches and generator on the CPU
    report = _existing_report(out_dir, model.name, model.revision)
    seqs = build_corpus(model.tokenizer, cfg)
    n_held = max(1, int(len(seqs) * cfg.heldout_tokens / (cfg.train_tokens + cfg.heldout_tokens)))
    heldout_seqs, train_seqs = seqs[:n_held], seqs[n_held:]
    print(f"{len(train_seqs)} training sequences, {len(heldout_seqs)} held out", flush=True)
    train_acts = collect_residuals(model, train_seqs, cfg.layers)
    held_acts = collect_residuals(model, heldout_seqs, cfg.layers)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = {"config": asdict(cfg), "chat_template": bool(getattr(model.tokenizer, "chat_template", None)),
           "threads": torch.get_num_threads(), **({"note": note} if note else {}),
           "collect_seconds": round(time.time() - started, 1)}
    report["runs"].append(run)
    for layer in cfg.layers:
        t0 = time.time()
        hook = f"{model.site_map.block_path(layer)}.output"
        sae = train_one(train_acts[layer], cfg, model.d_model, layer, hook)
        sae.fold_W_dec_norm()
        stats = evaluate_sae(sae, model, layer, held_acts[layer], heldout_seqs)
        stats.update(
            architecture="jumprelu (trained as batchtopk)",
            width=cfg.d_sae,
            k=cfg.k,
            train_tokens=int(train_acts[layer].shape[0]),
            tokens_seen=cfg.steps * cfg.batch_size,
            heldout_tokens=int(held_acts[layer].shape[0]),
            train_seconds=round(time.time() - t0, 1),
            run=len(report["runs"]) - 1,
        )
        target = out_dir / f"layer_{layer}"
        dtype = _compact(torch.cat([p.detach().flatten() for p in sae.parameters()])).dtype
        sae.to(dtype=dtype)
        sae.cfg.dtype = str(dtype).removeprefix("torch.")
        stats["dtype"] = sae.cfg.dtype
        sae.save_model(target)
        report["saes"][f"layer_{layer}"] = stats
        print(f"layer {layer}: {json.dumps(stats)}", flush=True)
        write_json_atomic(out_dir / "report.json", report)
    run["total_seconds"] = round(time.time() - started, 1)
    write_json_atomic(out_dir / "report.json", report)
    write_report_markdown(out_dir)
    return report


def _existing_report(out_dir: Path, model: str, revision: str) -> dict:
    """The report of the SAEs already in ``out_dir`` (as runs), or a new one; refuses SAEs of another model file."""
    path = out_dir / "report.json"
    if not path.exists():
        return {"model": model, "model_revision": revision, "runs": [], "saes": {}}
    report = as_runs(json.loads(path.read_text()))
    if report["model_revision"] != revision:
        raise BenchmarkError(
            f"{out_dir} holds SAEs of {report['model']} at {report['model_revision']}, not of this model file "
            f"({revision}): train into another folder (--out)")
    return report


def as_runs(report: dict) -> dict:
    """A report in the current form (``runs``: one entry per training command, each SAE naming its ``run``) from
    either form; reports written before SAEs could be added to a folder held one run at the top level."""
    if "runs" in report:
        return report
    run_keys = ("config", "chat_template", "threads", "note", "collect_seconds", "total_seconds")
    run = {k: report[k] for k in run_keys if k in report}
    out = {k: v for k, v in report.items() if k not in run_keys}
    out["runs"] = [run]
    out["saes"] = {name: {**s, "run": 0} for name, s in report["saes"].items()}
    return out


def _rebuild_options(model: str, cfg: dict) -> str:
    """The ``train-saes`` options that rebuild SAEs trained with ``cfg`` (the model and held-out size where they are
    not the defaults)."""
    options = "" if model == DEFAULT_MODEL else f"--model {model} "
    options += "--layers " + " ".join(map(str, cfg["layers"]))
    options += f" --width {cfg['d_sae']} --k {cfg['k']} --tokens {cfg['train_tokens']} --steps {cfg['steps']} "
    if cfg["heldout_tokens"] != TrainConfig.heldout_tokens:
        options += f"--heldout-tokens {cfg['heldout_tokens']} "
    if cfg.get("center"):
        options += "--center "
    return options + f"--seed {cfg['seed']}"


def _where(report: dict) -> str:
    """The CPU the report's times were measured on (reports before the thread count was kept: 2 cores)."""
    threads = report.get("threads")
    return "2 CPU cores" if threads is None else f"{threads} CPU thread{'s' if threads > 1 else ''}"


def write_report_markdown(out_dir: Path) -> Path:
    """Render ``report.json`` (written by training) as ``REPORT.md`` beside the weights."""
    from tabulate import tabulate

    report = as_runs(json.loads((out_dir / "report.json").read_text()))
    runs = report["runs"]
    rows = [[name, s["architecture"], s["width"], s["train_tokens"], s["tokens_seen"], s["l0"], s["fvu"],
             f"{100 * s['dead_share']:.2f}%", s["loss_clean"], s["loss_spliced"], f"+{s['loss_increase']:.3f}",
             f"{100 * s['loss_recovered_share']:.1f}%", s["train_seconds"], *([s["run"] + 1] if len(runs) > 1 else [])]
            for name, s in sorted(report["saes"].items(), key=lambda kv: int(kv[0].removeprefix("layer_")))]
    headers = ["SAE", "architecture", "width", "training tokens", "tokens seen", "L0", "FVU", "dead latents",
               "loss clean", "loss spliced", "loss increase (nats)", "loss gap recovered vs zero", "train s",
               *(["run"] if len(runs) > 1 else [])]
    sections = []
    for i, run in enumerate(runs):
        cfg = run["config"]
        layers = [int(n.removeprefix("layer_")) for n, s in report["saes"].items() if s["run"] == i]
        if not layers:  # every SAE of this run was retrained by a later one
            continue
        heading = [f"## Run {i + 1}: layers {', '.join(map(str, layers))}", ""] if len(runs) > 1 else []
        sections += [
            *heading,
            f"Config: `{json.dumps({k: v for k, v in cfg.items() if k != 'layers'})}`. Activation collection {run['collect_seconds']} s; total "
            f"{run.get('total_seconds', 'n/a')} s on {_where(run)} (times include whatever else shared the cores "
            "during the run).",
            "",
            *([run["note"], ""] if run.get("note") else []),
            "Rebuild (weights are written in float16 where every value fits it, else float32):",
            "",
            "```",
            "HF_HUB_OFFLINE=1 .venv/bin/benchmark train-saes " + _rebuild_options(report["model"], {**cfg, "layers": layers}),
            "```",
            "",
        ]
    text = "\n".join([
        f"# Reference SAEs for {report['model']}",
        "",
        "Generated from `report.json` by `benchmark train-saes`; held-out figures are on text never used in "
        "training. Position 0 (the attention sink) is excluded everywhere. `loss gap recovered` compares the "
        "spliced loss with zero-ablating the layer's residual."
        + (" The SAEs come from several training commands (runs), each with its own budget, below." if len(runs) > 1
           else ""),
        "",
        tabulate(rows, headers=headers, tablefmt="github"),
        "",
        f"Model revision: `{report['model_revision']}`.",
        "",
        *sections,
    ])
    target = out_dir / "REPORT.md"
    target.write_text(text)
    return target
