"""The parity parts: the fast GPU paths give what the plain paths give.

- flash:   flash-attn vs SDPA logits (bf16), vanilla and MoR expert choice (whose gathered
           recursion steps also take the mask-free flash path);
- compile: per-layer torch.compile (`megamor.train.compile`, as the trainer applies it) vs eager,
           fp32: loss, every gradient and the routing of two AdamW steps, vanilla / MoR expert /
           MoR token;
- engine:  the decoding engine's static step (a CUDA graph on GPU) and its dynamic step vs
           `generate()` on each request alone, greedy fp32 tokens and depths, requests joining
           and leaving a pool of fewer slots than requests;
- docmask: document masking through FlexAttention block masks vs the dense mask, fp32, training
           routing: loss and every gradient on a GPU (the compiled kernel with its backward),
           the loss on a CPU (no FlexAttention backward there), vanilla / MoR expert / MoR token;
- bf16:    30 AdamW steps in bf16 autocast on one batch (compiled on GPU, as the trainer runs):
           every loss finite and the mean of the last five below 0.95 x that of the first five.
"""

from __future__ import annotations

import copy
import math
import random
import time

import torch

from megamor.gpu_check.common import (
    ERROR,
    FAIL,
    PARITY,
    PASS,
    SKIPPED,
    Context,
    build_model,
    model_config,
    short_error,
    sync,
)
from megamor.gpu_check.parts import (
    BF16_STEPS,
    PARITY_VARIANTS,
    bf16_names,
    compile_names,
    docmask_names,
    engine_checks,
    flash_names,
)
from megamor.inference import Engine, generate
from megamor.model import layers
from megamor.train.compile import compile_layers, compile_wanted

SIZE = "135m"  # parity models (full form): the smallest paper size, real layer shapes
VARIANTS = ("vanilla", "mor_expert_3", "mor_token_3")  # parts.PARITY_VARIANTS, in order


def _guard(ctx: Context, names: list[str], fn) -> None:
    """Run checks; an exception is the error of those not yet written, and the part goes on."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- reported in the report, the other checks still run
        for name in names:
            if name not in ctx.emitted:
                ctx.check(PARITY, name, ERROR, note=short_error(e))


# -- flash-attn vs SDPA -------------------------------------------------------------------------
FLASH_TOL = 2e-2  # bf16: max |logit difference| over max |logit|


def flash(ctx: Context) -> None:

    names = flash_names(ctx.on_gpu)
    reason = None
    if not ctx.on_gpu:
        reason = "flash-attn runs on CUDA only (this run is on CPU)"
    elif layers.flash_attn_func is None:
        reason = "flash-attn not installed (import flash_attn failed); SDPA's own flash kernel is used"
    if reason:
        for n in names:
            ctx.check(PARITY, n, SKIPPED, target=f"max rel diff <= {FLASH_TOL:g}", note=reason)
        return
    real = layers.flash_attn_func
    calls = {"n": 0}

    def counted(*a, **k):  # counts that the flash kernel really ran
        calls["n"] += 1
        return real(*a, **k)

    for name, variant in zip(names, VARIANTS[:2]):
        def one(variant=variant, name=name) -> None:
            cfg = model_config(SIZE, variant, ctx.tiny)
            model = build_model(cfg, ctx.device, torch.bfloat16).eval()
            x = torch.randint(0, cfg.vocab_size, (2, 512), device=ctx.device)
            try:
                with torch.no_grad():
                    calls["n"] = 0
                    layers.flash_attn_func = counted
                    a = model(x).logits.float()
                    n_flash = calls["n"]
                    layers.flash_attn_func = None
                    b = model(x).logits.float()
            finally:
                layers.flash_attn_func = real
            rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
            agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
            ok = rel <= FLASH_TOL and n_flash > 0
            ctx.check(PARITY, name, PASS if ok else FAIL, f"max rel diff {rel:.2e}; top-1 agree {100 * agree:.1f}%",
                      f"max rel diff <= {FLASH_TOL:g}", f"{n_flash} flash-attn calls" + ("" if n_flash else " (flash never ran)"),
                      value=rel)
        _guard(ctx, [name], one)


# -- compiled vs eager --------------------------------------------------------------------------
def _train_step(model, x, opt) -> tuple[float, list[torch.Tensor], list[int]]:
    opt.zero_grad(set_to_none=True)
    out = model(x[:, :-1], targets=x[:, 1:], return_logits=False)
    (out.loss + out.aux_loss).backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    opt.step()
    return out.loss.item(), grads, out.stats.tokens_per_step


def compile_parity(ctx: Context) -> None:

    loss_tol, grad_tol = (1e-4, 1e-3) if ctx.on_gpu else (1e-5, 5e-5)
    B, T = (2, 512) if not ctx.tiny else (2, 32)
    # The trainer's own call on GPU; under --tiny one symbolic-length graph (CPU inductor is slow).
    kwargs: dict = {} if not ctx.tiny else {"dynamic": True}
    if ctx.compile_backend:
        kwargs["backend"] = ctx.compile_backend
    backend = ctx.compile_backend or "inductor"
    target = f"loss rel <= {loss_tol:g}, grads rel <= {grad_tol:g}, same routing"
    for name, variant in zip(compile_names(ctx.on_gpu), VARIANTS):

        def one(variant=variant, name=name) -> None:
            cfg = model_config(SIZE, variant, ctx.tiny)
            eager = build_model(cfg, ctx.device, torch.float32).train()
            comp = copy.deepcopy(eager)
            compile_layers(comp, **kwargs)
            g = torch.Generator().manual_seed(0)
            x = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(ctx.device)
            opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, comp)]
            loss_err = grad_err = 0.0
            same_routing = True
            t0 = time.perf_counter()
            first_s = None
            for _ in range(2):  # the second step runs on updated weights
                le, ge, re_ = _train_step(eager, x, opts[0])
                lc, gc, rc = _train_step(comp, x, opts[1])
                first_s = first_s if first_s is not None else time.perf_counter() - t0
                loss_err = max(loss_err, abs(le - lc) / max(1.0, abs(le)))
                scale = max(a.abs().max().item() for a in ge)
                grad_err = max(grad_err, max((a - b).abs().max().item() for a, b in zip(ge, gc)) / max(scale, 1e-12))
                same_routing &= re_ == rc and len(ge) == len(gc)
            ok = loss_err <= loss_tol and grad_err <= grad_tol and same_routing
            ctx.check(PARITY, name, PASS if ok else FAIL,
                      f"loss rel {loss_err:.1e}, grads rel {grad_err:.1e}, routing {'same' if same_routing else 'DIFFERS'}",
                      target, f"{backend}, fp32, {B}x{T}, 2 AdamW steps; first step (compiling) {first_s:.1f} s",
                      value=grad_err)
        _guard(ctx, [name], one)


# -- decoding engine vs generate() --------------------------------------------------------------
def _requests(vocab: int, tiny: bool) -> list[tuple[list[int], int]]:
    rng = random.Random(0)
    n, plen, new = (5, (2, 12), (3, 8)) if tiny else (5, (8, 40), (8, 16))
    return [([rng.randrange(1, vocab) for _ in range(rng.randrange(*plen))], rng.randrange(*new)) for _ in range(n)]


def _first_divergence(model, reqs, refs, handles) -> str | None:
    """None if every request's tokens and depths equal the reference; else a description."""
    for (prompt, _), ref, h in zip(reqs, refs, handles):
        if h.tokens == ref.tokens[0] and h.depths == ref.depths[0]:
            continue
        i = next((j for j, (a, b) in enumerate(zip(h.tokens, ref.tokens[0])) if a != b), None)
        if i is None:
            return f"depths differ for a {len(prompt)}-token prompt"
        # A greedy near-tie (the two tokens' logits equal within fp32 noise) is not a bug.
        with torch.no_grad():
            seq = torch.tensor([prompt + ref.tokens[0][:i]], device=model.embed_tokens.weight.device)
            lg = model(seq, causal_routing=True).logits[0, -1].float()
        margin = (lg[ref.tokens[0][i]] - lg[h.tokens[i]]).abs().item() / lg.abs().max().clamp_min(1e-12).item()
        tie = " (a near tie)" if margin < 1e-4 else ""
        return f"token {i} of a {len(prompt)}-token prompt differs: {h.tokens[i]} vs {ref.tokens[0][i]}, logit margin {margin:.1e}{tie}"
    return None


def engine(ctx: Context) -> None:

    slots = 3
    checks = engine_checks(ctx.on_gpu)
    for label, variant in zip(PARITY_VARIANTS, VARIANTS):
        runs = []
        for _, name, static, schedule in (c for c in checks if c[0] == label):
            if name.startswith("CUDA-graph") and not ctx.on_gpu:
                ctx.check(PARITY, name, SKIPPED, target="same greedy tokens and depths",
                          note="CUDA graphs need a GPU (this run is on CPU); the static step runs without one below")
            else:
                runs.append((name, static, schedule))

        def one(variant=variant, runs=runs) -> None:
            cfg = model_config(SIZE, variant, ctx.tiny)
            model = build_model(cfg, ctx.device, torch.float32, seed=1).eval()
            reqs = _requests(cfg.vocab_size, ctx.tiny)
            t0 = time.perf_counter()
            refs = [generate(model, [p], n) for p, n in reqs]
            ref_s = time.perf_counter() - t0
            for name, static, schedule in runs:
                t0 = time.perf_counter()
                eng = Engine(model, max_batch=slots, max_len=max(len(p) + n for p, n in reqs), static=static,
                             schedule=schedule, block_batch=2 if schedule == "depthwise" else None)
                handles = [eng.submit(p, n) for p, n in reqs]
                eng.run()
                sync(ctx.device)
                took = time.perf_counter() - t0
                bad = _first_divergence(model, reqs, refs, handles)
                notes = [f"{len(reqs)} requests on {slots} slots, fp32; {took:.1f} s (generate() {ref_s:.1f} s)"]
                graphed = True
                if static and schedule == "lockstep":
                    notes.append(f"overflow steps {eng.overflow_steps}/{eng.static_steps}")
                    if ctx.on_gpu:
                        graphed = eng.graph_step._graph is not None
                elif static:
                    dw = eng.depthwise
                    notes.append(f"block calls {dw.block_calls} (mixed depths {dw.mixed_calls}), overflows {dw.overflows}")
                    if ctx.on_gpu:
                        graphed = sorted(dw._graphs) == ["block", "enter", "flush"]
                if static and ctx.on_gpu:
                    notes.append("CUDA graph replayed" if graphed else "no CUDA graph was captured")
                ok = (bad is None or bad.endswith("(a near tie)")) and graphed
                n_tok = sum(len(h.tokens) for h in handles)
                figure = f"{n_tok} tokens equal" if bad is None else bad
                ctx.check(PARITY, name, PASS if ok else FAIL, figure, "same greedy tokens and depths", "; ".join(notes))
        _guard(ctx, [name for name, _, _ in runs], one)


# -- FlexAttention document masking vs the dense mask (issue 30.5) --------------------------------
def _packed_documents(vocab: int, B: int, T: int, device) -> dict[str, torch.Tensor]:
    """Rows of several documents of random lengths (positions restarting at each), as the data
    loader packs them with `data.document_masking`."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, T + 1), generator=g)
    doc = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    for r in range(B):
        cuts = sorted(torch.randint(1, T, (max(1, T // 128),), generator=g).tolist())
        start = 0
        for d, end in enumerate([*cuts, T]):
            doc[r, start:end] = d
            pos[r, start:end] = torch.arange(end - start)
            start = end
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "doc_ids": doc, "position_ids": pos}
    return {k: v.to(device) for k, v in batch.items()}


def docmask(ctx: Context) -> None:
    from megamor.model.flex import flex_unusable

    grads = ctx.on_gpu  # torch's FlexAttention has no CPU backward
    loss_tol, grad_tol = 1e-5, 1e-4
    B, T = (2, 1024) if not ctx.tiny else (2, 64)
    names = docmask_names(ctx.on_gpu)
    target = (f"loss rel <= {loss_tol:g}, logits" + (" and grads" if grads else "") + f" rel <= {grad_tol:g}, "
              "no dense mask under flex")
    for name, variant in zip(names, VARIANTS if ctx.on_gpu else VARIANTS[1:2]):

        def one(variant=variant, name=name) -> None:
            why = flex_unusable(torch.device(ctx.device), grads)
            if why:
                ctx.check(PARITY, name, SKIPPED, target=target, note=why)
                return
            cfg = model_config(SIZE, variant, ctx.tiny, [f"max_seq_len={T}"])
            model = build_model(cfg, ctx.device, torch.float32).train()  # training routing: top-k gathers
            batch = _packed_documents(cfg.vocab_size, B, T, ctx.device)
            got, dense_masks = {}, {}
            real_mask = layers.attention_mask
            t0 = time.perf_counter()
            for impl in ("dense", "flex"):
                model.doc_mask_impl = impl
                model.zero_grad(set_to_none=True)
                built: list[bool] = []
                layers.attention_mask = lambda q, kv, built=built: built.append(True) or real_mask(q, kv)
                try:
                    with torch.set_grad_enabled(grads):
                        out = model(batch["input_ids"], targets=batch["targets"], position_ids=batch["position_ids"],
                                    doc_ids=batch["doc_ids"], return_logits=True)
                        loss = out.loss + out.aux_loss
                        if grads:
                            loss.backward()
                finally:
                    layers.attention_mask = real_mask
                dense_masks[impl] = len(built)
                got[impl] = (loss.item(), out.logits.detach().float(),
                             [p.grad.clone() for p in model.parameters() if p.grad is not None])
            sync(ctx.device)
            (ld, xd, gd), (lf, xf, gf) = got["dense"], got["flex"]
            loss_err = abs(ld - lf) / max(1.0, abs(ld))
            logit_err = ((xd - xf).abs().max() / xd.abs().max().clamp_min(1e-12)).item()
            grad_err = 0.0
            if grads:
                scale = max(a.abs().max().item() for a in gd)
                grad_err = max((a - b).abs().max().item() for a, b in zip(gd, gf)) / max(scale, 1e-12)
            ok = (loss_err <= loss_tol and logit_err <= grad_tol and grad_err <= grad_tol and len(gd) == len(gf)
                  and dense_masks["flex"] == 0 < dense_masks["dense"])
            figure = (f"loss rel {loss_err:.1e}, logits rel {logit_err:.1e}" + (f", grads rel {grad_err:.1e}" if grads else "")
                      + f"; dense masks built: {dense_masks['flex']} (dense path: {dense_masks['dense']})")
            ctx.check(PARITY, name, PASS if ok else FAIL, figure, target,
                      f"fp32, {B}x{T}, up to {int(batch['doc_ids'].max()) + 1} documents a row, training routing; "
                      f"{time.perf_counter() - t0:.1f} s (flex compiles on first use)", value=grad_err)
        _guard(ctx, [name], one)


# -- bf16 training --------------------------------------------------------------------------------
def _learnable_batch(vocab: int, B: int, n: int, period: int = 16) -> torch.Tensor:
    """One batch that a model learns within 30 steps at any size: each row repeats a random
    16-token pattern over 256 token ids (uniform random tokens over the whole vocabulary barely
    move a small model's loss in 30 steps)."""
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(1, min(vocab, 256), (B, period), generator=g)
    return pattern.repeat(1, -(-n // period))[:, :n]


def bf16_training(ctx: Context) -> None:
    name = bf16_names(ctx.on_gpu)[0]

    def one() -> None:
        cfg = model_config(SIZE, "mor_expert_3", ctx.tiny)
        model = build_model(cfg, ctx.device).train()  # fp32 weights, bf16 autocast: the plain loop's precision
        compiled = compile_wanted("auto", ctx.device)
        if compiled:
            compile_layers(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3 if ctx.tiny else 6e-4, weight_decay=0.1,
                                fused=ctx.on_gpu)
        # Full form: train_135m's batch and length, so that part finds these graphs compiled.
        B, T = (4, 32) if ctx.tiny else (8, 2048)
        x = _learnable_batch(cfg.vocab_size, B, T + 1).to(ctx.device)
        losses = []
        for _ in range(BF16_STEPS):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
                out = model(x[:, :-1], targets=x[:, 1:], return_logits=False)
            (out.loss + out.aux_loss).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(out.loss.detach())
        vals = torch.stack(losses).float().tolist()
        finite = all(math.isfinite(v) for v in vals)
        first, last = sum(vals[:5]) / 5, sum(vals[-5:]) / 5
        ok = finite and last < 0.95 * first
        ctx.check(PARITY, name, PASS if ok else FAIL,
                  f"loss {vals[0]:.3f} -> {vals[-1]:.3f} (mean of first 5 {first:.3f}, last 5 {last:.3f})"
                  + ("" if finite else "; NOT FINITE"),
                  "all finite; last 5 mean < 0.95 x first 5 mean",
                  f"MoR expert-3, one {B}x{T} batch of repeated patterns, AdamW, bf16 autocast, {'compiled' if compiled else 'eager'}",
                  value=last / first if first else None, losses=vals)
    _guard(ctx, [name], one)
