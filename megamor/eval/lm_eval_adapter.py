"""lm-evaluation-harness model "megamor": any megamor checkpoint behind lm-eval's `LM` API.

Python:
    from megamor.eval.lm_eval_adapter import MegamorLM
    lm = MegamorLM(model=model_or_checkpoint_path, tokenizer=tok_or_path, batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=TaskManager(include_path="evals/tasks"))
Command line (lm-eval does not discover plugins, so a wrapper imports this module first):
    python evals/lm_eval_megamor.py --model megamor --model_args checkpoint=run/,tokenizer=tok.model \
        --batch_size 32 --include_path evals/tasks --tasks megamor_hellaswag
(lm-eval passes --batch_size and --device itself; model_args takes checkpoint, tokenizer,
dtype, max_length (default: the model's max_seq_len), max_batch_tokens, add_prefix,
max_gen_toks, progress, allow_tokenizer_mismatch.) The tokenizer is checked against the one the
checkpoint was trained with (megamor.eval.identity): a mismatch stops it unless
allow_tokenizer_mismatch=true.

Scoring goes through the same `Scorer` as the built-in harness (causal routing, right
padding, content-ordered batches), and tokenization through lm-eval's own
`TemplateLM._encode_pair` with `tok_encode` prepending EOS (the document-start token), so
the two paths give the same numbers (tests/eval/test_lm_eval_parity.py).
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401 - populate lm-eval's registry before adding to it
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from megamor.inference.generate import generate
from megamor.runs.find import find_tokenizer
from megamor.runs.load import load_model_and_meta

from .errors import EvalInputError
from .identity import check_identity
from .perplexity import rolling_requests
from .scoring import ContinuationTooLong, Scorer, model_max_length
from .tokenizer import EvalTokenizer, load_tokenizer


def _bool(x: Any) -> bool:
    return x if isinstance(x, bool) else str(x).lower() in ("1", "true", "yes")


@register_model("megamor")
class MegamorLM(TemplateLM):
    def __init__(
        self,
        checkpoint: str | None = None,
        tokenizer: str | EvalTokenizer | None = None,
        model: torch.nn.Module | str | None = None,
        batch_size: int | str = 16,
        max_batch_tokens: int | str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int | str | None = None,
        add_prefix: bool | str = True,
        max_gen_toks: int | str = 256,
        progress: bool | str = False,
        allow_tokenizer_mismatch: bool | str = False,
        **kwargs: Any,
    ):
        super().__init__()
        source = model if model is not None else checkpoint
        if source is None:
            raise ValueError("megamor: pass checkpoint=<file|run folder|HF export> (or model=<nn.Module>)")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's CLI defaults to cuda
        self.model, meta = load_model_and_meta(source, device=device)
        if tokenizer is None:
            tokenizer = find_tokenizer(source)
            if tokenizer is None:
                raise ValueError("megamor: pass tokenizer=<tokenizer.model, tokenizer.json or their folder>; none found beside the checkpoint")
        self.tok: EvalTokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str,)) or hasattr(tokenizer, "__fspath__") else tokenizer
        self.identity = check_identity(meta, source if model is None else "the model", self.tok,
                                       allow_mismatch=_bool(allow_tokenizer_mismatch),
                                       flag="allow_tokenizer_mismatch=true in --model_args")
        if batch_size == "auto":
            batch_size = 16
        self.scorer = Scorer(
            self.model,
            batch_size=int(batch_size),
            max_batch_tokens=int(max_batch_tokens) if max_batch_tokens else None,
            max_length=int(max_length) if max_length else None,  # default: the model's max_seq_len
            dtype=dtype,
            pad_id=self.tok.eos_id,
            progress=_bool(progress),
        )
        self.add_prefix = _bool(add_prefix)
        self.max_gen_toks = int(max_gen_toks)
        self._device = torch.device(device)

    # -- tokenization (lm-eval calls these) ---------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tok, "path", "megamor-tokenizer"))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        ids = self.tok.encode(string)
        if self.add_prefix and add_special_tokens is not False:
            ids = [self.tok.eos_id] + ids
        return ids

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tok.decode(tokens)

    # -- the three request types --------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        try:
            results = self.scorer.loglikelihood(pairs)
        except ContinuationTooLong as e:
            key = requests[e.index][0]  # (context, continuation) strings, when lm-eval gives them
            what = f"continuation {key[1][:40]!r}..." if key else "a request"
            raise EvalInputError(f"{what}: {e}; pass a larger max_length in --model_args "
                                 f"(the model's max_seq_len is {model_max_length(self.model)})") from None
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Disjoint windows of max_length, the first conditioned on EOS (lm-eval's definition)."""
        reqs, owner = [], []
        for i, (string,) in enumerate(r.args for r in requests):
            for w in rolling_requests(self.tok.encode(string), self.tok.eos_id, self.max_length):
                reqs.append(w)
                owner.append(i)
        scored = self.scorer.score_requests(reqs, desc="loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for i, s in zip(owner, scored):
            totals[i] += s.total
        for r, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), t)
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled with do_sample/temperature) decoding with the model's KV cache,
        cut at the first `until` string."""
        args = [r.args for r in requests]
        out: list[str | None] = [None] * len(args)
        groups: dict[str, list[int]] = {}  # requests with the same generation settings decode together
        for i, (_, kw) in enumerate(args):
            groups.setdefault(repr(sorted((kw or {}).items())), []).append(i)
        bs = self.scorer.batch_size
        for idx in groups.values():
            kw = dict(args[idx[0]][1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            sample = bool(kw.get("do_sample", False))
            temperature = float(kw.get("temperature", 0.0)) if sample else 0.0
            top_k, top_p = (kw.get("top_k"), kw.get("top_p")) if sample else (None, None)
            budget = self.max_length - max_new  # prompt tokens kept (its end), as lm-eval's hf model
            if budget < 1:
                raise EvalInputError(f"a generation request asks for max_gen_toks={max_new} new tokens in a context of "
                                     f"max_length={self.max_length}: no room for its prompt; pass a larger max_length "
                                     "(up to the model's max_seq_len) or a smaller max_gen_toks in --model_args")
            for start in range(0, len(idx), bs):
                chunk = idx[start : start + bs]
                prompts = [self.tok_encode(args[i][0])[-budget:] for i in chunk]
                with self.scorer.autocast():
                    gen = generate(self.model, prompts, max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                                   eos_id=self.tok.eos_id)
                for i, toks in zip(chunk, gen.tokens):
                    text = self.tok.decode([t for t in toks if t != self.tok.eos_id])
                    for u in until:
                        if u and u in text:
                            text = text.split(u)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", args[i], text)
        return out  # type: ignore[return-value]
