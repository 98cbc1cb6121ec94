#!/usr/bin/env python
"""Block sizes and paths of the fused decoding step, swept on a GPU in one process: each configuration
(module constants of mamba_ssm/ops/triton/decode_step.py, fused_step's MODE and batch limits) is set,
the model's CUDA graphs dropped, and the 1.4b shape's ms/token measured in a CUDA graph at each batch,
with the GPU time per kernel name (mambakit/bench/decode.py's measure and kernel_profile).

    python tools/device/decode_step_sweep.py --batch 1 --configs '{"MODE": "2"}' '{"MODE": "3", "_OUT_ROWS": 8}'
--combine adds, per batch, the best configuration's keys merged over those of the best one that differs
in other keys (e.g. the best out_proj setting with the best in_proj setting). Writes --out, prints a table.
"""
import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _bench():
    spec = importlib.util.spec_from_file_location("_decode_bench", REPO / "mambakit" / "bench" / "decode.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def apply(cfg, defaults):
    from mamba_ssm.modules import fused_step
    from mamba_ssm.ops.triton import decode_step

    for k in defaults:  # back to the code's values first
        setattr(*defaults[k])
    for k, v in cfg.items():
        owner = fused_step if k in ("MODE", "PARTIALS_MAX_BATCH", "GEMV_MAX_BATCH") else decode_step
        if not hasattr(owner, k):
            raise SystemExit(f"no setting {k}")
        defaults.setdefault(k, (owner, k, getattr(owner, k)))
        setattr(owner, k, v)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", nargs="+", default=["{}"])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--shape", default="1.4b")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--combine", action="store_true")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "decode_sweep.json"))
    a = p.parse_args()
    import torch
    from mamba_ssm.modules import fused_step
    from mamba_ssm.utils.cuda_graph import clear_cuda_graphs

    b = _bench()
    model = b.build_model(a.shape, "cuda", torch.bfloat16)
    rows, defaults = [], {}

    def run(cfg, batch):
        apply(cfg, defaults)
        clear_cuda_graphs(model)
        fused_step._proven.clear()
        try:
            with torch.inference_mode():
                res = b.measure(model, batch, 16, a.new_tokens, 3, True, "cuda")
                res.update(b.kernel_profile(model, batch, 16, "cuda"))
            res["fused_step"] = fused_step.report()
        except Exception as e:  # noqa: BLE001  (a config that fails to compile is a result too)
            res = {"error": f"{type(e).__name__}: {str(e)[:800]}"}
        res.update(config=cfg, batch=batch)
        rows.append(res)
        Path(a.out).write_text(json.dumps(rows, indent=1))
        if "error" in res:
            print(f"b{batch} {json.dumps(cfg)}: ERROR {res['error']}", flush=True)
            return res
        print(f"b{batch} {json.dumps(cfg)}: {res['ms_per_token']:.4f} ms/token, {res['kernels_per_token']} kernels, "
              f"{res['kernel_us_per_token_total']} us of kernels", flush=True)
        for k, v in list(res["kernel_us_per_token"].items())[:5]:
            print(f"      {v:8.1f} us  {k}", flush=True)
        return res

    for batch in a.batch:
        done = [run(json.loads(c), batch) for c in a.configs]
        ok = sorted((r for r in done if "error" not in r), key=lambda r: r["ms_per_token"])
        if a.combine and ok:
            best = ok[0]["config"]
            other = next((r["config"] for r in ok[1:] if not set(r["config"]) - {"MODE"} <= set(best)), None)
            if other is not None:
                merged = {**other, **best}
                if merged not in [r["config"] for r in done]:
                    run(merged, batch)
    best = {}
    for r in rows:
        if "error" not in r and (r["batch"] not in best or r["ms_per_token"] < best[r["batch"]]["ms_per_token"]):
            best[r["batch"]] = r
    for batch, r in sorted(best.items()):
        print(f"best at batch {batch}: {r['ms_per_token']:.4f} ms/token {json.dumps(r['config'])}")


if __name__ == "__main__":
    main()
