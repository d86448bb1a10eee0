"""The token-draw kernel: its reference draws from softmax(logits / T) (chi-square, a hand case), and the kernel
makes the reference's draw for its own uniforms on random data (the CUDA engine's sampled log-probs:
test_engine_cuda)."""

import os
import subprocess
import sys

import pytest
import torch

from qerl.kernels.token_draw import draw_tokens_reference


def chi2_ok(counts: torch.Tensor, p: torch.Tensor) -> bool:
    """Pearson's chi-square of counts against probabilities p below the 0.999 quantile (Wilson-Hilferty)."""
    n, df = counts.sum().item(), p.numel() - 1
    stat = (((counts - n * p) ** 2) / (n * p)).sum().item()
    z = 3.09  # 0.999 normal quantile
    return stat < df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def test_reference_draws_from_the_tempered_softmax():
    """Inverse-CDF with uniform u: token frequencies over 200,000 draws match softmax(logits / T) (chi-square at
    0.999); the log-prob is log_softmax(logits / T) at the token. Hand case: logits [0, ln 3] at T 1 give
    probabilities 1/4, 3/4, so u < 1/4 draws token 0 and u >= 1/4 token 1."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 12, generator=g) * 2
    for t in (1.0, 0.7):
        rows = logits.repeat(200_000, 1)
        tok, lp = draw_tokens_reference(rows, t, torch.rand(200_000, generator=g))
        p = (logits[0].double() / t).softmax(-1)
        assert chi2_ok(torch.bincount(tok, minlength=12).double(), p)
        assert torch.allclose(lp.double(), p.log()[tok], atol=1e-6)
    two = torch.tensor([[0.0, torch.log(torch.tensor(3.0)).item()]]).repeat(4, 1)
    tok, lp = draw_tokens_reference(two, 1.0, torch.tensor([0.1, 0.2499, 0.2501, 0.9]))
    assert tok.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(lp.exp(), torch.tensor([0.25, 0.25, 0.75, 0.75]))


def check_draw(logits, t, u, tok, lp, tol=2e-6) -> float:
    """The kernel's token is the inverse-CDF pick of u: u x total lies in its CDF interval (float64, widened by
    tol x total for the kernel's fp32 sums), its log-prob is log_softmax(logits / T) there (1e-5). Returns the
    fraction of rows where it is exactly the float64 reference's token."""
    ref_tok, _ = draw_tokens_reference(logits, t, u)
    logp = (logits.double() / t).log_softmax(-1)
    cdf = logp.exp().cumsum(-1)
    hi = cdf.gather(-1, tok[:, None]).squeeze(-1)
    lo = hi - logp.gather(-1, tok[:, None]).squeeze(-1).exp()
    x = u.double() * cdf[:, -1]
    assert ((lo - tol <= x) & (x <= hi + tol)).all(), (tok, ref_tok)
    assert (lp.double() - logp.gather(-1, tok[:, None]).squeeze(-1)).abs().max() < 1e-5
    return (tok == ref_tok).double().mean().item()


_INTERPRETED = """
import torch
from test_token_draw import check_draw
from qerl.kernels.token_draw import draw_tokens, row_uniforms
torch.manual_seed(0)
for dt in (torch.float32, torch.bfloat16):
    for b, v, block, t in ((5, 1000, 256, 0.7), (3, 2048, 512, 1.0), (2, 333, 128, 1.3)):
        logits = (torch.randn(b, v) * 3).to(dt)
        seed = torch.tensor([1234 + v], dtype=torch.int64)
        tok, lp = draw_tokens(logits, t, seed, block=block)
        assert check_draw(logits, t, row_uniforms(seed, b), tok, lp) == 1.0
# most entries without mass (exp underflows): the draw takes one of the few with mass, its log-prob finite
peaked = torch.full((4, 1000), -1e4)
peaked[:, [3, 300, 999]] = torch.tensor([0.0, 1.0, 2.0])
for s in range(5):
    tok, lp = draw_tokens(peaked, 1.0, torch.tensor([s]), block=256)
    assert set(tok.tolist()) <= {3, 300, 999} and torch.isfinite(lp).all(), (tok, lp)
masked = torch.randn(3, 1000)
masked[:, :600] = float("-inf")  # whole chunks and part of one without mass (a model's masked tokens)
tok, lp = draw_tokens(masked, 0.8, torch.tensor([9]), block=256)
assert check_draw(masked, 0.8, row_uniforms(torch.tensor([9]), 3), tok, lp) == 1.0 and (tok >= 600).all()
u0, u1 = row_uniforms(torch.tensor([5]), 4), row_uniforms(torch.tensor([6]), 4)
assert ((u0 >= 0) & (u0 < 1)).all() and not torch.equal(u0, u1)  # another seed, other uniforms
print("ok")
"""


def test_kernel_is_the_reference_draw_interpreted():
    """(CPU, Triton's interpreter) the kernel picks the reference's token for its own uniforms, over several
    chunks with a ragged last one, fp32 and bf16 logits, three temperatures; log-probs within 1e-5."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([root, os.path.join(root, "tests")]))
    r = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_at_the_qwen_vocabulary(rows, dtype):
    """The rollout's shape (151,936 entries): each token the inverse-CDF pick of the kernel's uniform; nearly all
    exactly the float64 reference's (the rest within the fp32 sums' rounding of a boundary)."""
    from qerl.kernels.token_draw import draw_tokens, row_uniforms

    torch.manual_seed(rows)
    logits = (torch.randn(rows, 151936, device="cuda") * 4).to(dtype)
    same = []
    for _ in range(4):
        seed = torch.randint(2**31 - 1, (1,), device="cuda")
        tok, lp = draw_tokens(logits, 0.7, seed)
        same.append(check_draw(logits, 0.7, row_uniforms(seed, rows), tok, lp))
    assert sum(same) / len(same) > 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_draws_from_the_tempered_softmax():
    """Frequencies of 100,000 kernel draws (one launch of 100,000 identical rows) match softmax(logits / T)."""
    from qerl.kernels.token_draw import draw_tokens

    torch.manual_seed(0)
    logits = torch.randn(1, 24, device="cuda")
    rows = logits.repeat(100_000, 1).bfloat16()
    tok, lp = draw_tokens(rows, 0.7, torch.tensor([7], device="cuda"))
    p = (rows[0].double() / 0.7).softmax(-1)
    assert chi2_ok(torch.bincount(tok, minlength=24).double().cpu(), p.cpu())
    torch.testing.assert_close(lp.double(), p.log()[tok], rtol=0, atol=1e-5)
