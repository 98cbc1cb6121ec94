"""Where the benchmark scripts write by default: one file per benchmark and configuration in
benchmarks/results/, under a stable name without date or run number, overwritten by the next run
of the same configuration (git history keeps the earlier ones). The date, the card and the
versions are recorded inside each file.

    results_path("selective_scan", gpu_tag("NVIDIA H100 80GB HBM3"))  # .../selective_scan_h100.json
    results_path("cpu_model", "130m")                                  # .../cpu_model_130m.json
"""
from __future__ import annotations

import re
from pathlib import Path

# the repository's benchmarks/results (benchmarks run from a checkout)
RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def gpu_tag(device_name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100': the card in result file names."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", device_name)
    return m.group(1).lower() if m else (re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "gpu")


def card_tag(device) -> str:
    """The card of a torch device (or device string): gpu_tag of the CUDA device's name, else 'cpu'."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return gpu_tag(torch.cuda.get_device_name(device))


def results_path(*parts: str, results_dir: str | Path | None = None) -> Path:
    """results_dir (default benchmarks/results) / "<part>_<part>_....json"."""
    return Path(results_dir or RESULTS_DIR) / ("_".join(str(p) for p in parts if p) + ".json")
