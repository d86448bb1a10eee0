"""The CUDA engine's own logic on CPU, its Triton kernels in Triton's interpreter (TRITON_INTERPRET=1; its
linears on the dequantize + matmul path, since the Gluon kernels need a GPU): prompts shared by their samples,
compactions into smaller buckets as rows finish, the token draw. Against the reference engine token for token
(greedy), and each sampled token's log-prob against the model's fresh forward (ragged groups)."""

import os
import subprocess
import sys

import pytest

_SCRIPT = """
import torch
from conftest import qerl_logits
from test_engine_cuda import Tok
from qerl.bench import build_random_model
from qerl.kernels.choice import LinearKernel
from qerl.modeling import ModelArgs
from qerl.rollout import Engine, SamplingParams
from qerl.rollout.cuda import CudaEngine

ARGS = ModelArgs(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6, attention_bias=True)
g = torch.Generator().manual_seed(1)
prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (5, 11, 8)]
model = build_random_model(ARGS, "nvfp4", lora_rank=4, device="cpu", dtype=torch.float32, seed=1)
fast = lambda tok, **kw: CudaEngine(model, tok, kernels={LinearKernel.CUBLAS}, **kw)

# greedy, 3 prompts x 2 samples; an EOS that ends some rows early makes the engine compact (6 -> 4 -> 2 rows)
params = SamplingParams(temperature=0.0, max_new_tokens=12, n=2)
eos = int(Engine(model, Tok()).generate(prompts, params).completion_ids[0, 3])
ref = Engine(model, Tok(eos)).generate(prompts, params)
got = fast(Tok(eos), check_every=2).generate(prompts, params)
assert ref.lengths != [12] * 6, ref.lengths
assert torch.equal(got.completion_ids, ref.completion_ids) and torch.equal(got.mask, ref.mask)
assert (got.logprobs - ref.logprobs).abs().max() < 1e-4

# sampled, 2 prompts x 8 samples each stopped at its own length: buckets 16, 8, 4, 2, 1
limits = tuple(torch.randint(1, 9, (16,), generator=g).tolist())
params = SamplingParams(temperature=0.8, max_new_tokens=8, n=8, seed=3, row_max_tokens=limits)
r = fast(Tok(), check_every=1).generate(prompts[:2], params)
assert r.lengths == list(limits)
for i in range(16):
    prompt, toks = prompts[i // 8], r.completion_ids[i][r.mask[i]].tolist()
    logits = qerl_logits(model, torch.tensor([prompt + toks]))[0, len(prompt) - 1 : -1]
    lp = (logits / 0.8).log_softmax(-1).gather(-1, torch.tensor(toks)[:, None]).squeeze(-1)
    assert (r.logprobs[i][r.mask[i]] - lp).abs().max() < 1e-4, i
print("ok")
"""


def test_cuda_engine_logic_interpreted():
    pytest.importorskip("triton")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([os.path.dirname(tests), tests]))
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
