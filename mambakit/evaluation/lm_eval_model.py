"""lm-evaluation-harness model `mamba`: our MambaLMHeadModel behind lm-eval's `LM` interface.

    python evals/lm_harness_eval.py --model mamba \
        --model_args pretrained=DIR_OR_HUB_ID,tokenizer=TOKENIZER_DIR,dtype=float32 \
        --tasks gsm8k_local --include_path evals/tasks --device cpu --batch_size auto

model_args:
  pretrained      hub id or directory, upstream's or transformers' checkpoint layout (or, from
                  Python, an already-built MambaLMHeadModel)
  tokenizer       directory or tokenizer.json; default: the model directory's, else the hub's
                  EleutherAI/gpt-neox-20b
  dtype           auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16
  device          cuda, cuda:N, cpu (a CUDA request without CUDA falls back to the CPU, with a warning)
  peft            a PEFT adapter directory (LoRA, ...), applied on load; pretrained=ADAPTER_DIR
                  alone also works (its adapter_config.json names the base model)
  peft_merge      merge the adapter into the weights (default true; same numbers, faster)
  max_length      context length in tokens for truncation and rolling windows (default 2048)
  max_gen_toks    default generation budget when a task sets none (default 256)
  batch_size      an integer, or auto / auto:N (see `_TokenBudget`)
  max_batch_size  cap on rows in one batch under auto (default 64 on CUDA, 32 on CPU)
  cuda_graph      on CUDA, run each decoding step as a captured CUDA graph (default true; one
                  launch per token instead of one per kernel; falls back to eager steps if
                  capture fails)
  packed          run the sequences of a batch as one packed row (cu_seqlens: no padding, each
                  sequence from a zero state) in loglikelihood forwards and generation prefills
                  (default true; used only where the model's mixers take cu_seqlens)

Under `accelerate launch` or `torchrun` (WORLD_SIZE > 1) each process is one rank of lm-eval's
data-parallel mode (mambakit/evaluation/data_parallel.py).

Why this model and not lm-eval's `mamba_ssm`: Mamba is recurrent, so left padding (what HF-style
batched generation uses) changes the state of every row it pads, and lm-eval's wrapper generates to
the maximum length whatever the stop sequences. Here:
  * loglikelihood: sequences sorted by length, packed into one row (or, with packed=false, right
    padded: a token can only influence later positions, so padding after the last real token
    cannot change a result), identical inputs
    computed once (multiple-choice continuations of one token share everything), and the LM head
    applied only at the positions that are scored;
  * generate_until: mamba_ssm's DecodingSession: the prompts are prefilled as packed rows (or,
    with packed=false, each set of prompts of one length on its own) into their rows of the
    batch's cache, and one batched `step` per token
    decodes every row, whatever its prompt length; a row leaves the batch when it emits EOS or one
    of the stop strings, and the loop ends as soon as every row has;
  * loglikelihood_rolling: lm-eval's disjoint rolling windows of max_length tokens.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import lm_eval.models  # noqa: F401  (fills the registry's built-in entries before ours is added)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mambakit.evaluation import data_parallel

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm comes with lm-eval
    def tqdm(x=None, **_):
        return x

logger = logging.getLogger(__name__)

MODEL_NAME = "mamba"
REPO_ROOT = Path(__file__).resolve().parents[1]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
# Defaults of auto batching on the CPU (where running out of memory kills the process, so sizes
# are not probed): tokens per loglikelihood batch and rows per generation batch.
CPU_TOKEN_BUDGET = 8192
CPU_MAX_BATCH = 32
CUDA_MAX_BATCH = 64
_GEN_KEYS_IGNORED = {"max_length", "use_cache", "num_beams"}


def parse_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or str(dtype).lower() == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    key = str(dtype).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"mamba: dtype {dtype!r} is not one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[key]


def parse_device(device) -> torch.device:
    if device is None or str(device) == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        logger.warning("mamba: device %s requested but CUDA is not available; running on the CPU", device)
        return torch.device("cpu")
    return dev


def parse_batch_size(batch_size) -> tuple[int | None, bool]:
    """(fixed size or None, auto?) from 8, "8", "auto" or "auto:N" (N re-probes are not needed:
    the budget adapts by itself, so N is accepted and ignored)."""
    if batch_size is None:
        return 1, False
    if isinstance(batch_size, int):
        if batch_size < 1:
            raise ValueError(f"mamba: batch_size must be >= 1, got {batch_size}")
        return batch_size, False
    s = str(batch_size).strip().lower()
    if s == "auto" or s.startswith("auto:"):
        return None, True
    try:
        return parse_batch_size(int(s))
    except ValueError:
        raise ValueError(f"mamba: batch_size must be an integer, 'auto' or 'auto:N', got {batch_size!r}") from None


def _as_bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "y", "on")
    return bool(v)


def resolve_tokenizer(tokenizer=None, model_dir=None):
    """Explicit tokenizer, else the model directory's, else the hub's EleutherAI/gpt-neox-20b."""
    from mambakit.tokenizer import load_tokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if model_dir is not None and Path(str(model_dir)).is_dir():
        d = Path(str(model_dir))
        if (d / "tokenizer.json").exists() or (d / "tokenizer_config.json").exists():
            return load_tokenizer(d)
    return load_tokenizer(None)  # GPT-NeoX-20B from the hub (needs a network or a filled cache)


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


class _TokenBudget:
    """How many sequences go in one batch.

    A fixed batch_size means that many rows. Under auto, a batch holds as many rows as fit in a
    token budget (rows x padded length), capped at max_batch_size: short sequences get large
    batches, long ones small. On CUDA the budget starts at max_batch_size rows of the longest
    sequence and is halved whenever a batch runs out of memory (the batch is then retried), so it
    settles at a size that fits; on the CPU it is CPU_TOKEN_BUDGET, not probed.
    """

    def __init__(self, fixed: int | None, max_batch: int, cuda: bool):
        self.fixed, self.max_batch, self.cuda = fixed, max_batch, cuda
        self.tokens: int | None = None if cuda else CPU_TOKEN_BUDGET

    def rows(self, length: int) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.tokens is None:
            self.tokens = self.max_batch * max(length, 1)
        return max(1, min(self.max_batch, self.tokens // max(length, 1)))

    def shrink(self, rows: int, length: int) -> bool:
        """After an OOM with `rows` rows of `length`: False if nothing smaller can be tried."""
        if rows <= 1:
            return False
        if self.fixed is not None:
            self.fixed = max(1, rows // 2)
            logger.warning("mamba: out of memory at batch size %d; continuing with %d", rows, self.fixed)
        else:
            self.tokens = max(1, (rows // 2) * max(length, 1))
            logger.warning("mamba: out of memory at %d rows x %d tokens; budget now %d tokens",
                           rows, length, self.tokens)
        if self.cuda:
            torch.cuda.empty_cache()
        return True


def _adapter_as_pretrained(pretrained: str, peft, tokenizer):
    """pretrained=ADAPTER_DIR (a PEFT adapter, no model config) means: its base model plus the
    adapter, with the adapter folder's tokenizer when it has one. Returns (pretrained, peft, tokenizer)."""
    d = Path(pretrained)
    if peft or not (d / "adapter_config.json").is_file() or (d / "config.json").is_file():
        return pretrained, peft, tokenizer
    import json

    base = json.loads((d / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"mamba: {d} is a PEFT adapter without base_model_name_or_path; pass "
                         "pretrained=BASE_MODEL,peft=ADAPTER_DIR")
    if tokenizer is None and ((d / "tokenizer.json").exists() or (d / "tokenizer_config.json").exists()):
        tokenizer = str(d)
    logger.info("mamba: %s is a PEFT adapter; loading its base %s with it", d, base)
    return base, str(d), tokenizer


class MambaEvalLM(TemplateLM):
    """lm-eval LM over mamba_ssm's MambaLMHeadModel (registered as `mamba`)."""

    backend = "causal"

    def __init__(self, pretrained="state-spaces/mamba-130m", tokenizer=None, dtype="auto", device=None, peft=None,
                 peft_merge=True, max_length=2048, max_gen_toks=256, batch_size=1, max_batch_size=None,
                 cuda_graph=True, packed=True, trust_remote_code=None, **kwargs):
        super().__init__()
        if kwargs:
            logger.warning("mamba: ignoring model_args it does not know: %s", ", ".join(sorted(kwargs)))
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        self._rank, self._world_size, local_rank = data_parallel.launched_ranks()
        self._device = parse_device(device)
        if self._world_size > 1:  # lm-eval's data-parallel mode (accelerate launch / torchrun)
            self._device = data_parallel.rank_device(self._device, local_rank)
            data_parallel.init_process_group(self._device)
        self._dtype = parse_dtype(dtype, self._device)
        self._max_length = int(max_length)
        self._max_gen_toks = int(max_gen_toks)
        if self._max_length < 2:
            raise ValueError(f"mamba: max_length must be >= 2, got {max_length}")
        fixed, auto = parse_batch_size(batch_size)
        cuda = self._device.type == "cuda"
        max_batch = int(max_batch_size) if max_batch_size else (CUDA_MAX_BATCH if cuda else CPU_MAX_BATCH)
        self._fixed_batch_size = fixed
        self._budget_cls = lambda: _TokenBudget(None if auto else fixed, max_batch, cuda)
        self.batch_size_per_gpu = "auto" if auto else fixed
        self.batch_sizes: dict[str, int] = {}

        if isinstance(pretrained, torch.nn.Module):
            model, self.pretrained = pretrained.to(device=self._device, dtype=self._dtype), type(pretrained).__name__
            model_dir = None
        else:
            pretrained, peft, tokenizer = _adapter_as_pretrained(str(pretrained), peft, tokenizer)
            self.pretrained = pretrained
            model = MambaLMHeadModel.from_pretrained(self.pretrained, device=self._device, dtype=self._dtype)
            model_dir = self.pretrained
        if peft:
            model = self._apply_peft(model, peft, _as_bool(peft_merge))
        self.peft = str(peft) if peft else None
        model.eval()
        self._model = model
        # The module whose backbone / lm_head are called directly (a PeftModel wraps it).
        self._core = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.tokenizer = resolve_tokenizer(tokenizer, model_dir)
        self.vocab_size = len(self.tokenizer)
        self.stats = {"decode_steps": 0, "forward_rows": 0}
        self._cuda_graph = _as_bool(cuda_graph)  # decoding steps as CUDA graphs (CUDA only)
        self._compact = True  # eager decoding drops finished rows from the batch
        from mamba_ssm.ops.packing import model_takes_packed_sequences

        self._packed = _as_bool(packed) and model_takes_packed_sequences(self._core)

    # --- construction helpers --------------------------------------------------------------

    def _apply_peft(self, model, adapter_dir, merge: bool):
        path = Path(str(adapter_dir))
        if not path.is_dir() or not (path / "adapter_config.json").exists():
            raise FileNotFoundError(f"mamba: peft={adapter_dir} is not a PEFT adapter directory "
                                    "(expected a folder with adapter_config.json)")
        try:
            from peft import PeftModel
        except ImportError as e:
            raise ImportError("mamba: peft=... needs the `peft` package (pip install peft)") from e
        model = PeftModel.from_pretrained(model, str(path))
        model = model.to(device=self._device, dtype=self._dtype)
        return model.merge_and_unload() if merge else model

    # --- properties lm-eval reads ----------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def model(self):
        return self._model

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "gpt-neox").replace("/", "__")

    # --- lm-eval's data-parallel mode (mambakit/evaluation/data_parallel.py) -------------------

    def all_gather(self, tensor):
        return data_parallel.all_gather(tensor, self._world_size) if self._world_size > 1 else tensor

    def gather_object(self, obj, dst=0):
        return data_parallel.gather_object(obj, self._rank, self._world_size, dst) if self._world_size > 1 else [obj]

    def barrier(self) -> None:
        if self._world_size > 1:
            data_parallel.barrier()

    def get_model_info(self) -> dict:
        n = sum(p.numel() for p in self._model.parameters())
        return {"model_num_parameters": n, "model_dtype": str(self._dtype), "model_revision": "local",
                "model_sha": "", "peft": self.peft or ""}

    # --- tokenization -------------------------------------------------------------------------

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens, skip_special_tokens=True) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- model calls ------------------------------------------------------------------------

    def _hidden(self, input_ids, **packed):
        core = self._core
        if hasattr(core, "backbone") and hasattr(core, "lm_head"):
            return core.backbone(input_ids, **packed)
        return None

    def _logits_at(self, input_ids, rows_positions, **packed):
        """Log-probabilities (float32) at the given positions.

        input_ids (B, L); rows_positions: list of (row, LongTensor of positions); packed: cu_seqlens
        for a packed row. Returns a list of (n_i, vocab) tensors. The LM head runs only on those positions.
        """
        hidden = self._hidden(input_ids, **packed)
        if hidden is None:  # a model without backbone / lm_head: full logits
            logits = self._core(input_ids, **packed).logits
            return [F.log_softmax(logits[r, pos].float(), dim=-1) for r, pos in rows_positions]
        rows = torch.cat([torch.full((len(p),), r, dtype=torch.long) for r, p in rows_positions]).to(hidden.device)
        pos = torch.cat(list(p for _, p in rows_positions)).to(hidden.device)
        logp = F.log_softmax(self._core.lm_head(hidden[rows, pos]).float(), dim=-1)
        return list(torch.split(logp, [len(p) for _, p in rows_positions]))

    def _run_batched(self, items, length_of, run, budget: _TokenBudget, desc: str, disable_tqdm: bool):
        """Call run(batch) over `items` (already sorted, longest first) in budgeted batches, with
        retries at a smaller size after a CUDA out-of-memory error."""
        pbar = tqdm(total=len(items), desc=desc, disable=disable_tqdm or self.rank != 0)
        i = 0
        while i < len(items):
            length = length_of(items[i])
            n = budget.rows(length)
            batch = items[i:i + n]
            try:
                run(batch)
            except Exception as e:  # noqa: BLE001 - only OOM is retried, the rest re-raised
                if _is_oom(e) and budget.shrink(len(batch), length):
                    continue
                raise
            self.batch_sizes.setdefault(desc, len(batch))
            i += len(batch)
            if pbar is not None:
                pbar.update(len(batch))
        if pbar is not None:
            pbar.close()

    # --- loglikelihood ------------------------------------------------------------------------

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [(cache key or None, context tokens, continuation tokens)] -> [(logprob, is_greedy)].

        Each input is (context + continuation)[-(max_length + 1):][:-1], as in lm-eval's HF model;
        the continuation's tokens are scored at the last positions.
        """
        results: list[Any] = [None] * len(requests)
        by_input: dict[tuple, list[int]] = defaultdict(list)  # input tokens -> requests sharing them
        targets: dict[int, tuple[list[int], int]] = {}  # request -> (scored tokens, how many)
        for idx, (_, ctx, cont) in enumerate(requests):
            if len(cont) == 0:
                results[idx] = (0.0, True)
                continue
            full = (list(ctx) + list(cont))[-(self.max_length + 1):]
            if len(full) < 2:
                raise ValueError("mamba: a loglikelihood request needs a context token before its continuation")
            ncont = min(len(cont), len(full) - 1)
            targets[idx] = (full[-ncont:], ncont)
            by_input[tuple(full[:-1])].append(idx)
        # Longest first: the first batch is the largest, so memory trouble shows at once.
        inputs = sorted(by_input, key=lambda t: (-len(t), t))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id

        def run(batch):
            packed = {}
            if self._packed and len(batch) > 1:  # one row, no padding: [inp_0 inp_1 ...], cu_seqlens
                ids = torch.tensor([sum((list(inp) for inp in batch), [])], dtype=torch.long)
                lengths = torch.tensor([len(inp) for inp in batch])
                cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
                packed["cu_seqlens"] = cu.to(torch.int32).to(self._device)
                rows_positions = []
                for inp, end in zip(batch, cu[1:].tolist()):
                    n = max(targets[i][1] for i in by_input[inp])
                    rows_positions.append((0, torch.arange(end - n, end)))
            else:
                length = len(batch[0])
                ids = torch.full((len(batch), length), pad, dtype=torch.long)
                rows_positions = []
                for r, inp in enumerate(batch):
                    ids[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)  # right padding
                    n = max(targets[i][1] for i in by_input[inp])
                    rows_positions.append((r, torch.arange(len(inp) - n, len(inp))))
            self.stats["forward_rows"] += len(batch)
            logps = self._logits_at(ids.to(self._device), rows_positions, **packed)
            for inp, logp in zip(batch, logps):
                greedy_all = logp.argmax(dim=-1)
                for i in by_input[inp]:
                    toks, n = targets[i]
                    tgt = torch.tensor(toks, dtype=torch.long, device=logp.device)
                    lp = logp[-n:].gather(1, tgt[:, None]).squeeze(1)
                    res = (float(lp.sum()), bool((greedy_all[-n:] == tgt).all()))
                    results[i] = res
                    key = requests[i][0]
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, res)

        self._run_batched(inputs, len, run, self._budget_cls(), "loglikelihood", disable_tqdm)
        return results

    @torch.inference_mode()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for doc_idx, req in enumerate(requests):
            (string,) = req.args
            toks = self.tok_encode(string)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=toks, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(doc_idx)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for doc_idx, (lp, _) in zip(owner, scores):
            totals[doc_idx] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ----------------------------------------------------------------------------

    def _gen_settings(self, gen_kwargs: dict) -> dict:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        if isinstance(until, str):
            until = [until]
        elif until is None:
            until = []
        elif not isinstance(until, (list, tuple)):
            raise ValueError(f"mamba: generation 'until' must be a string or a list of strings, got {until!r}")
        until = [u for u in until if u]
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        if eos and eos not in until:
            until.append(eos)
        max_gen = None
        for k in ("max_gen_toks", "max_new_tokens", "max_tokens"):
            if k in kw:
                v = kw.pop(k)
                max_gen = v if max_gen is None else max_gen
        max_gen = int(max_gen) if max_gen is not None else self.max_gen_toks
        do_sample = _as_bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0))
        top_k = int(kw.pop("top_k", 0) or 0)
        top_p = float(kw.pop("top_p", 1.0) or 1.0)
        min_p = float(kw.pop("min_p", 0.0) or 0.0)
        sample = do_sample and temperature > 0
        for k in list(kw):
            if k in _GEN_KEYS_IGNORED:
                kw.pop(k)
        if kw:
            logger.warning("mamba: ignoring generation arguments it does not know: %s", ", ".join(sorted(kw)))
        return {"until": tuple(until), "max_gen_toks": max_gen, "sample": sample,
                "temperature": temperature if sample else 0.0, "top_k": top_k if sample else 1,
                "top_p": top_p if sample else 1.0, "min_p": min_p if sample else 0.0}

    def _prefill(self, session, prompts: list[list[int]], budget: _TokenBudget):
        """Prefill each row of `session` with its prompt: prompts of one length together, longest
        first, in chunks of the budget's rows; a chunk that runs out of memory is retried smaller.
        Packed: prompts of any lengths together, longest first, in chunks of at most the tokens that
        the budget gives the longest's padded rows."""
        if session.packed_prefill:
            order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
            start = 0
            while start < len(order):
                longest = len(prompts[order[start]])
                limit, total, end = budget.rows(longest) * longest, 0, start
                while end < len(order) and (end == start or total + len(prompts[order[end]]) <= limit):
                    total += len(prompts[order[end]])
                    end += 1
                chunk = order[start:end]
                if self._prefill_chunk(session, prompts, chunk, budget, longest):
                    start = end
            return
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            by_len[len(p)].append(i)
        for length, idxs in sorted(by_len.items(), reverse=True):
            start = 0
            while start < len(idxs):
                chunk = idxs[start:start + budget.rows(length)]
                if self._prefill_chunk(session, prompts, chunk, budget, length):
                    start += len(chunk)

    def _prefill_chunk(self, session, prompts, chunk, budget, longest) -> bool:
        """Prefill prompts[chunk] into their rows; False after an out-of-memory error that shrank the
        budget (the caller retries smaller), which is raised when nothing smaller is left."""
        try:
            session.prefill([prompts[i] for i in chunk], rows=chunk)
        except Exception as e:  # noqa: BLE001
            if _is_oom(e) and budget.shrink(len(chunk), longest):
                return False
            raise
        self.stats["forward_rows"] += len(chunk)
        return True

    def _stop_strings(self, until):
        """stop(row, tokens) for DecodingSession.generate: True once the text ends in a stop string."""
        if not until:
            return None
        # A stop string of b bytes lies within the last b + 1 tokens when it first appears.
        window = max(len(u.encode("utf-8")) for u in until) + 1

        def stop(row, tokens):
            tail = self.tokenizer.decode(tokens[-window:], skip_special_tokens=False)
            return any(u in tail for u in until)

        return stop

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], s: dict, budget: _TokenBudget) -> list[list[int]]:
        """Token ids generated for each prompt (EOS left out, stop string text not yet cut off).

        Eager steps drop finished rows from the batch; a CUDA-graph step has a fixed batch, so
        finished rows keep stepping (their tokens are ignored) until every row is done.
        """
        from mamba_ssm.utils.generation import DecodingSession

        max_gen = s["max_gen_toks"]
        if max_gen <= 0:
            return [[] for _ in prompts]
        cg = self._cuda_graph and self._device.type == "cuda"
        session = DecodingSession(self._core, len(prompts), max(len(p) for p in prompts) + max_gen, cg=cg,
                                  packed_prefill=self._packed)
        self._prefill(session, prompts, budget)
        out = session.generate(
            max_gen, top_k=s["top_k"], top_p=s["top_p"] if s["top_p"] < 1.0 else 0.0, min_p=s["min_p"],
            temperature=s["temperature"] if s["sample"] else 1.0, eos_token_id=self.eot_token_id,
            stop=self._stop_strings(s["until"]), vocab_size=self.vocab_size, drop_finished=self._compact)
        if cg and session.step_kind == "eager":  # the capture failed (and warned): no more graphs
            self._cuda_graph = False
        self.stats["decode_steps"] += session.steps
        eot = self.eot_token_id
        return [toks[:-1] if toks and toks[-1] == eot else toks for toks in out.to_lists()]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[Any] = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        settings, prompts = {}, {}
        for idx, req in enumerate(requests):
            context, gen_kwargs = req.args
            s = self._gen_settings(gen_kwargs)
            key = tuple(sorted(s.items()))
            settings[key] = s
            groups[key].append(idx)
            max_ctx = self.max_length - s["max_gen_toks"]
            if max_ctx <= 0:
                raise ValueError(f"mamba: max_gen_toks ({s['max_gen_toks']}) must be below max_length "
                                 f"({self.max_length})")
            toks = self.tok_encode(context)[-max_ctx:]
            prompts[idx] = toks if toks else [self.prefix_token_id]
        pbar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or self.rank != 0)
        for key, idxs in groups.items():
            s = settings[key]
            idxs = sorted(idxs, key=lambda i: -len(prompts[i]))
            budget = self._budget_cls()
            start = 0
            while start < len(idxs):
                # Decoding holds only the recurrent states, so rows are capped by the batch size
                # (or max_batch_size under auto); prefill is budgeted by tokens separately.
                rows = budget.fixed if budget.fixed is not None else budget.max_batch
                chunk = idxs[start:start + rows]
                gens = self._generate_batch([prompts[i] for i in chunk], s, budget)
                for i, toks in zip(chunk, gens):
                    text = self.tok_decode(toks)
                    for u in s["until"]:
                        text = text.split(u)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                self.batch_sizes.setdefault("generate_until", len(chunk))
                start += len(chunk)
                if pbar is not None:
                    pbar.update(len(chunk))
        if pbar is not None:
            pbar.close()
        return results


def register(name: str = MODEL_NAME):
    """Register MambaEvalLM with lm-eval under `name` (idempotent)."""
    current = model_registry.get(name, None) if name in model_registry else None
    if current is MambaEvalLM:
        return MambaEvalLM
    if current is not None and isinstance(current, type) and current.__qualname__ == MambaEvalLM.__qualname__:
        return current  # same class from a reloaded module
    model_registry.register(name)(MambaEvalLM)
    return MambaEvalLM


register()

__all__ = ["MambaEvalLM", "register", "resolve_tokenizer", "parse_dtype", "parse_batch_size", "MODEL_NAME"]
