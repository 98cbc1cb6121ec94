"""The one backend switch: forcing, environment variable, warn-once fallback."""
import warnings

import pytest
import torch

from mamba_ssm import backend
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn


def test_cpu_tensors_use_torch_in_auto_mode(monkeypatch):
    monkeypatch.setattr(backend, "_ENV_CHOICE", "auto")
    assert backend.choose_backend("selective_scan", on_cuda=False) == "torch"


def test_environment_variable_and_set_backend(monkeypatch):
    """MAMBA_SSM_BACKEND is read once, at import; set_backend / use_backend win over it."""
    assert backend.backend_from_environment({backend.ENV_VAR: "Torch"}) == "torch"
    assert backend.backend_from_environment({}) == "auto"
    with pytest.raises(ValueError, match="MAMBA_SSM_BACKEND must be one of .* got 'nonsense'"):
        backend.backend_from_environment({backend.ENV_VAR: "nonsense"})
    monkeypatch.setattr(backend, "_ENV_CHOICE", "torch")  # as MAMBA_SSM_BACKEND=torch at import
    assert backend.requested_backend() == "torch"
    with backend.use_backend("auto"):
        assert backend.requested_backend() == "auto"
    assert backend.requested_backend() == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.set_backend("nonsense")


def test_a_bad_environment_value_stops_the_import():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import mamba_ssm"], capture_output=True, text=True,
                       env={**__import__("os").environ, backend.ENV_VAR: "gpu"})
    assert r.returncode != 0 and "MAMBA_SSM_BACKEND must be one of" in r.stderr


def test_forcing_an_unavailable_backend_is_an_error(monkeypatch):
    monkeypatch.setattr(backend, "_ENV_CHOICE", "auto")
    with backend.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="not on a CUDA device"):
            backend.choose_backend("selective_scan", on_cuda=False)
    monkeypatch.setattr(backend, "available_backends", lambda op: ["torch"])
    with backend.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="not available"):
            backend.choose_backend("selective_scan", on_cuda=True)


def test_forcing_applies_to_ops_that_have_that_backend(monkeypatch):
    """Forcing cuda does not break the causal conv, which has no CUDA kernel: it is chosen as in
    auto mode (Triton where it runs, else PyTorch)."""
    monkeypatch.setattr(backend, "_ENV_CHOICE", "auto")
    monkeypatch.setattr(backend, "available_backends", lambda op: ["triton", "torch"])
    with backend.use_backend("cuda"):
        assert backend.choose_backend("causal_conv1d", on_cuda=True) == "triton"
        assert backend.choose_backend("causal_conv1d", on_cuda=False) == "torch"
    with backend.use_backend("triton"):
        with pytest.raises(RuntimeError, match="not on a CUDA device"):
            backend.choose_backend("causal_conv1d", on_cuda=False)


def test_cuda_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(backend, "_ENV_CHOICE", "auto")
    monkeypatch.setattr(backend, "available_backends", lambda op: ["torch"])
    monkeypatch.setattr(backend, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backend.choose_backend("some_op", on_cuda=True) == "torch"
        assert backend.choose_backend("some_op", on_cuda=True) == "torch"
    assert len([w for w in caught if "falling back" in str(w.message)]) == 1


def test_forced_torch_backend_runs_the_scan(monkeypatch):
    monkeypatch.setattr(backend, "_ENV_CHOICE", "torch")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    args = (torch.randn(1, 4, 5), torch.rand(1, 4, 5), -torch.rand(4, 3), torch.randn(1, 3, 5), torch.randn(1, 3, 5))
    torch.testing.assert_close(selective_scan_fn(*args), selective_scan_ref(*args))


def test_cuda_scan_entry_points_say_when_the_extension_is_missing(monkeypatch):
    # without the compiled extension (any CPU-only install) the CUDA scan's entry points raise an
    # error that names the missing module instead of an AttributeError on None
    from mamba_ssm.ops import selective_scan_cuda as ssc

    monkeypatch.setattr(ssc, "_ext", None)
    assert not ssc.is_available()
    x = torch.zeros(1, 4, 8)
    args = (x, x, torch.zeros(4, 16), torch.zeros(1, 16, 8), torch.zeros(1, 16, 8))
    with pytest.raises(RuntimeError, match="_selective_scan_cuda is not built"):
        ssc.forward_plan(*args)
    with pytest.raises(RuntimeError, match="_selective_scan_cuda is not built"):
        ssc.selective_scan_cuda(*args)
