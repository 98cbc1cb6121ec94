"""causal_conv1d_fn: its inference path (shifted multiply-adds) against conv1d, and its gradients."""
import pytest
import torch
import torch.nn.functional as F

from mamba_ssm.ops.causal_conv1d import causal_conv1d_fn


def conv1d_reference(x, w, b, activation):
    out = F.conv1d(x, w.unsqueeze(1), b, padding=w.shape[1] - 1, groups=w.shape[0])[..., :x.shape[-1]]
    return F.silu(out) if activation else out


@pytest.mark.parametrize("seqlen", [1, 2, 3, 4, 37])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_inference_path_equals_conv1d(seqlen, bias, activation):
    torch.manual_seed(seqlen)
    x = torch.randn(2, 6, seqlen).transpose(1, 2).contiguous().transpose(1, 2)  # channel-last, as in Mamba
    w, b = torch.randn(6, 4), (torch.randn(6) if bias else None)
    with torch.no_grad():
        got = causal_conv1d_fn(x, w, b, activation=activation)
    torch.testing.assert_close(got, conv1d_reference(x, w, b, activation), rtol=1e-5, atol=1e-6)


def test_gradients_still_flow_through_conv1d():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, requires_grad=True)
    w = torch.randn(6, 4, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    causal_conv1d_fn(x, w, b, activation="silu").square().sum().backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    conv1d_reference(x, w, b, "silu").square().sum().backward()
    for g, t in zip(grads, (x, w, b)):
        torch.testing.assert_close(g, t.grad)
