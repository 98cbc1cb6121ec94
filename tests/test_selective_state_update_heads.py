"""selective_state_update with heads (Mamba-2's decoding step) and state_batch_indices, against a float64
step written here."""
import pytest
import torch
import torch.nn.functional as F

from mamba_ssm.ops.triton.selective_state_update import selective_state_update


def step64(state, x, dt, A, B, C, D, z, dt_bias):
    """state (b, h, p, n); dt (b, h) tied over p; A (h,); B, C (b, g, n); D, dt_bias (h,)."""
    h, g = x.shape[1], B.shape[1]
    dt = F.softplus(dt.double() + dt_bias.double())
    Bh, Ch = B.double().repeat_interleave(h // g, 1), C.double().repeat_interleave(h // g, 1)
    new = state.double() * torch.exp(dt * A.double())[..., None, None] \
        + (dt[..., None] * x.double())[..., None] * Bh[:, :, None, :]
    y = (new * Ch[:, :, None, :]).sum(-1) + D.double()[:, None] * x.double()
    return y * F.silu(z.double()), new


def inputs(b=3, h=4, p=5, n=6, g=2, slots=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(state=r(slots, h, p, n), x=r(b, h, p), dt=r(b, h), A=-torch.rand(h, generator=gen), B=r(b, g, n),
                C=r(b, g, n), D=r(h), z=r(b, h, p), dt_bias=r(h))


def heads_call(t, state, **kw):
    h, p, n = state.shape[1:]
    return selective_state_update(
        state, t["x"], t["dt"][..., None].expand(-1, -1, p), t["A"][:, None, None].expand(h, p, n), t["B"], t["C"],
        D=t["D"][:, None].expand(h, p), z=t["z"], dt_bias=t["dt_bias"][:, None].expand(h, p), dt_softplus=True, **kw)


def test_heads_step_matches_the_oracle():
    t = inputs(slots=3)
    state = t["state"].clone()
    out = heads_call(t, state)
    want, want_state = step64(t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"])
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.double(), want_state, atol=1e-5, rtol=1e-5)


def test_state_batch_indices_with_padding_rows():
    t = inputs(b=3, slots=5)
    state = t["state"].clone()
    idx = torch.tensor([4, -1, 1], dtype=torch.int32)
    out = heads_call(t, state, state_batch_indices=idx)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for row, slot in ((0, 4), (2, 1)):
        sel = {k: t[k][row:row + 1] for k in ("x", "dt", "B", "C", "z")}
        want, want_state = step64(t["state"][slot:slot + 1], sel["x"], sel["dt"], t["A"], sel["B"], sel["C"], t["D"],
                                  sel["z"], t["dt_bias"])
        torch.testing.assert_close(out[row:row + 1].double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state[slot:slot + 1].double(), want_state, atol=1e-5, rtol=1e-5)
    for slot in (0, 2, 3):   # untouched slots
        assert torch.equal(state[slot], t["state"][slot])


@pytest.mark.parametrize("idx,match", [
    (torch.tensor([0, 1]), r"state_batch_indices must be an integer tensor \(batch,\) = \(3,\)"),
    (torch.tensor([0, 1, 5]), r"state_batch_indices must be < the state's 5 slots"),
    (torch.tensor([0.0, 1.0, 2.0]), r"state_batch_indices must be an integer tensor"),
])
def test_bad_state_batch_indices(idx, match):
    t = inputs()
    with pytest.raises(ValueError, match=match):
        heads_call(t, t["state"].clone(), state_batch_indices=idx)
