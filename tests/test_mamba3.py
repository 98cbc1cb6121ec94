"""Mamba3: importable where upstream 2.3 has it; building one says it is not implemented."""
import pytest


def test_mamba3_imports_as_in_upstream_and_says_it_is_not_implemented():
    import mamba_ssm
    from mamba_ssm import Mamba3
    from mamba_ssm.modules.mamba3 import Mamba3 as Mamba3Module

    assert Mamba3 is Mamba3Module and "Mamba3" in mamba_ssm.__all__
    with pytest.raises(NotImplementedError, match=r"Mamba3\(d_model=64\): Mamba-3 layers are not implemented"):
        Mamba3(d_model=64, d_state=128, headdim=64, is_mimo=True)
    with pytest.raises(NotImplementedError, match="Mamba-3"):
        Mamba3(32)
