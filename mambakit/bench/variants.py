"""What the benchmarks against upstream share: variants of ours (environments, other trees) and upstream
mamba-ssm, each measured in child processes, and the one JSON they write (decode.py, training.py, ssd.py;
model.py runs decode.py's and training.py's children into one JSON).

Upstream's package has our import name (`mamba_ssm`), so a process holds one of them: each child runs
the benchmark's script with `--child` from a temporary directory, PYTHONPATH = the variant's tree alone
(ours: this repository; `PYTHONPATH=DIR` in a variant: DIR; upstream: --upstream-path; training.py also
keeps the parent's entries that hold no `mamba_ssm`), the variant's other variables set, and prints
one line `RESULT {json}`. A child that crashes, runs out of memory or times out is an entry with an
"error" string; the run goes on. The parent's loop over the children (the time budget, the record, the
card, the log line, the ratios and the JSON written after every child) is `run_children`.

Loaded by file path (`load_sibling`), as decode.py and training.py are, so that no process imports
`mambakit` or a `mamba_ssm` other than the one its PYTHONPATH names.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

# name: (d_model, n_layer); Mamba-1 checkpoints' shapes (d_state 16, expand 2, d_conv 4), and
# mamba2-*: upstream's state-spaces/mamba2-* (Mamba2 layers: d_state 128, headdim 64, expand 2)
SHAPES = {"tiny": (64, 2), "130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "1.4b": (2048, 48),
          "2.8b": (2560, 64), "mamba2-tiny": (64, 2), "mamba2-130m": (768, 24), "mamba2-370m": (1024, 48),
          "mamba2-780m": (1536, 48), "mamba2-1.3b": (2048, 48), "mamba2-2.7b": (2560, 64)}
MARKER = "RESULT "
REPO = Path(__file__).resolve().parents[2]
SKIPPED_BUDGET = "skipped: --budget-s spent"


def load_sibling(name: str):
    """mambakit/bench/<name>.py loaded by path (once per process), without importing `mambakit`."""
    key = f"_mamba_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(name + ".py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod  # dataclasses and pickling look modules up by name
        spec.loader.exec_module(mod)
    return sys.modules[key]


# ------------------------------------------------------------------------------------------- child
def build_lm(shape, device, dtype, seed=0, vocab=50280):
    """A MambaLMHeadModel of the named shape with random weights, through the API that ours and
    upstream's share (vocab padded to a multiple of 8)."""
    import torch
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    if shape not in SHAPES:
        raise ValueError(f"--shape: expected one of {sorted(SHAPES)}, got {shape!r}")
    d_model, n_layer = SHAPES[shape]
    torch.manual_seed(seed)
    ssm_cfg = {"layer": "Mamba2"} if shape.startswith("mamba2-") else {}
    cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab, ssm_cfg=ssm_cfg, rms_norm=True,
                      residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8)
    return MambaLMHeadModel(cfg, device=device, dtype=dtype)


def import_variant_mamba_ssm():
    """The child's `mamba_ssm`, which must come from its variant's tree (the first PYTHONPATH entry):
    an installed package found instead (an editable install of this repository, say) would be
    measured under the variant's name."""
    import mamba_ssm

    tree = Path(os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or ".").resolve()
    found = Path(mamba_ssm.__file__).resolve().parent
    if tree not in found.parents:
        raise ModuleNotFoundError(f"no mamba_ssm in the variant's tree {tree} (PYTHONPATH); "
                                  f"Python imported {found} instead", name="mamba_ssm")
    return mamba_ssm


def emit(result: dict) -> None:
    """The child's answer to the parent: one line on stdout."""
    print(MARKER + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------ parent
def parse_variant(spec: str):
    """'name:VAR=value,VAR=value' -> (name, {VAR: value}); 'name' alone: no extra environment."""
    name, _, envs = spec.partition(":")
    name = name.strip()
    if not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"--variants: expected name:VAR=value,..., got {spec!r}")
    env = {}
    for kv in filter(None, (s.strip() for s in envs.split(","))):
        key, eq, value = kv.partition("=")
        if not eq or not key:
            raise ValueError(f"--variants {name}: expected VAR=value, got {kv!r}")
        env[key] = value
    return name, env


def resolve_variants(specs, upstream_path, baseline):
    """[(name, env)] of --variants plus "upstream" when --upstream-path is given, and the baseline
    (default: upstream if given, else the first variant)."""
    variants = [parse_variant(s) for s in specs]
    if upstream_path:
        variants.append(("upstream", {"PYTHONPATH": str(Path(upstream_path).resolve())}))
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"--variants: names must differ, got {names}")
    baseline = baseline or ("upstream" if upstream_path else names[0])
    if baseline not in names:
        raise ValueError(f"--baseline must name a variant ({names}), got {baseline!r}")
    return variants, baseline


def child_env(env: dict, base=os.environ, keep_other_paths=False) -> dict:
    """The child's environment: PYTHONPATH = the variant's tree (this repository unless it names one).
    keep_other_paths: then the parent's PYTHONPATH entries that hold neither `mamba_ssm` nor `mambakit`
    (absolute), e.g. a directory where PEFT was installed."""
    out = {k: v for k, v in base.items() if k != "PYTHONPATH"}
    out.update(env)
    paths = [env.get("PYTHONPATH") or str(REPO)]
    if keep_other_paths:
        for entry in filter(None, base.get("PYTHONPATH", "").split(os.pathsep)):
            p = Path(entry).resolve()
            if not (p / "mamba_ssm").exists() and not (p / "mambakit").exists() and str(p) not in paths:
                paths.append(str(p))
    out["PYTHONPATH"] = os.pathsep.join(paths)
    out["PYTHONUNBUFFERED"] = "1"
    return out


def run_child(cmd: list, env: dict, timeout: float, stub: dict, keep_other_paths=False) -> dict:
    """Run `cmd` as the variant's child; its RESULT (with wall_s), else `stub` with an error."""
    t0 = time.perf_counter()
    child = child_env(env, keep_other_paths=keep_other_paths)
    with tempfile.TemporaryDirectory() as cwd:  # neither this repository nor the cwd on the child's path
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=child, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            return {**stub, "error": f"timed out after {timeout} s", "output": out[-2000:]}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            out = json.loads(line[len(MARKER):])
            out["wall_s"] = round(time.perf_counter() - t0, 2)
            return out
    return {**stub, "error": f"child exited {proc.returncode} without a result",
            "output": (proc.stdout + proc.stderr)[-3000:]}


def gpu_tag(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; '' -> 'cpu' (the card in result file names)."""
    return load_sibling("results").gpu_tag(device_name) if device_name else "cpu"


def gpu_name() -> str:
    """The first GPU's name from nvidia-smi (no CUDA context in this process), else 'gpu'."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
        return out[0].strip() if out else "gpu"
    except (OSError, subprocess.SubprocessError):
        return "gpu"


def git_commit() -> dict:
    def git(*a):
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except OSError:
        return {}


def new_result(kind: str, args, variants, shape_dims: dict) -> dict:
    """The JSON's frame: date, machine (the card once known), versions, git, inputs, one entry per variant."""
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    result = {"kind": kind, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"host": platform.node(), "platform": platform.platform(), "cpu_count": os.cpu_count()},
              "versions": versions, "git": git_commit(),
              "inputs": {k: v for k, v in vars(args).items() if k not in ("child", "env_names")},
              "variants": {n: {"env": env, "runs": {}} for n, env in variants}}
    result["inputs"]["shape_dims"] = shape_dims
    if (args.device or "cuda").startswith("cuda") and torch.cuda.is_available():
        result["machine"]["device_name"] = gpu_name()  # children report theirs too (torch's name)
    return result


def result_dirs(args) -> list:
    """Where a parent writes its JSON: --results-dir, and --out-dir too when given."""
    return [args.results_dir] + ([args.out_dir] if args.out_dir else [])


def write(result: dict, prefix: str, dirs) -> list:
    """<dir>/<prefix>_<shape>_<card>.json in each of dirs (written whole, then renamed); without an
    inputs["shape"] (a benchmark of several shapes): <dir>/<prefix>_<card>.json."""
    results = load_sibling("results")
    card = gpu_tag(result["machine"].get("device_name", ""))
    paths = []
    for d in dirs:
        path = results.results_path(prefix, result["inputs"].get("shape"), card, results_dir=d)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(path)
        paths.append(path)
    return paths


class Child(NamedTuple):
    """One child process of a benchmark run: variant `name` with its `env`; its record goes to
    result["variants"][name]["runs"][key] (a tuple key: nested, runs[key[0]][key[1]]...). `stub`: the
    fields of its record when it does not run; a stub with an "error" is recorded as it is and the
    child not started (a mode upstream does not run). `label` names it in the log (default: the key)."""
    name: str
    env: dict
    key: str | tuple
    stub: dict
    label: str = ""


def run_children(result: dict, children, measure, *, summary, add_ratios, baseline: str, prefix: str, dirs,
                 budget_s: float = 0.0, table=None, log=print) -> list:
    """The parent's loop of every benchmark against upstream: each Child in order, measured by
    measure(child) -> its record (run_child's: the child's RESULT or an entry with an "error"), unless
    its stub has an error or budget_s seconds (0: no limit) have passed since the first (then an entry
    "skipped: --budget-s spent"). After each: the record stored, the card the child reports kept as
    the machine's, one log line ("[name label] " + summary(record) or its error), add_ratios(result,
    baseline), and the JSON written (`write`), so a run cut short keeps what it measured. At the end:
    the ratios and the JSON once more, the table (table(result)) and the paths logged. Returns the paths."""
    t_start = time.perf_counter()
    for c in children:
        if "error" in c.stub:
            r = dict(c.stub)
        elif budget_s and time.perf_counter() - t_start > budget_s:
            r = {**c.stub, "error": SKIPPED_BUDGET}
        else:
            r = measure(c)
        keys = c.key if isinstance(c.key, tuple) else (c.key,)
        runs = result["variants"][c.name]["runs"]
        for k in keys[:-1]:
            runs = runs.setdefault(k, {})
        runs[keys[-1]] = r
        if r.get("device_name"):
            result["machine"]["device_name"] = r["device_name"]
        log(f"[{c.name} {c.label or ' '.join(keys)}] " + (f"ERROR {r['error'][:300]}" if "error" in r else
                                                         f"{summary(r)} ({r.get('wall_s')} s)"))
        add_ratios(result, baseline)
        write(result, prefix, dirs)
    add_ratios(result, baseline)
    paths = write(result, prefix, dirs)
    if table is not None:
        log(table(result))
    log("wrote " + ", ".join(map(str, paths)))
    return paths


def ratio(a, b):
    return round(a / b, 4) if a and b else None


def col(x, width, digits):
    """x right-aligned in `width` with `digits` decimals; '-' when not a number."""
    return f"{x:>{width}.{digits}f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def add_parent_arguments(p, default_variants) -> None:
    """The options every benchmark against upstream takes (and the hidden child protocol's)."""
    import argparse

    p.add_argument("--variants", nargs="*", default=None,
                   help="name:VAR=value,... each in its own children; PYTHONPATH=DIR times another tree "
                        f"(default: {' '.join(default_variants)})")
    p.add_argument("--upstream-path", default=None, help="directory holding upstream's built mamba_ssm (a variant "
                                                         "'upstream' with that directory alone on PYTHONPATH)")
    p.add_argument("--baseline", default=None, help="variant the ratios refer to (default: upstream if given, "
                                                    "else the first variant)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--child-timeout", type=float, default=300.0, help="seconds per child process")
    p.add_argument("--budget-s", type=float, default=0.0, help="start no child after this many seconds (0: no limit); "
                                                               "the rest are recorded as skipped")
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--out-dir", default=None, help="also write the JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--env-names", default="", help=argparse.SUPPRESS)
