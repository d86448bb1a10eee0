import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from qerl.noise import AQNConfig, apply_noise, aqn_sigma, norm_weights

# --- schedule ----------------------------------------------------------------


def test_exp_schedule_hand_values():
    cfg = AQNConfig()  # 1e-2 -> 5e-4, K = 10, exp
    # 100 steps, 10 stages of 10 steps; stage 0 is noise-free.
    assert [aqn_sigma(s, 100, cfg) for s in range(10)] == [0.0] * 10
    assert aqn_sigma(10, 100, cfg) == 1e-2  # stage 1: sigma_start
    assert aqn_sigma(19, 100, cfg) == 1e-2
    # stage 5: 1e-2 * (5e-4 / 1e-2) ** (4 / 8) = 1e-2 * sqrt(0.05) = 2.2360680e-3
    assert aqn_sigma(50, 100, cfg) == pytest.approx(2.2360680e-3, rel=1e-7)
    # stage 2: 1e-2 * 0.05 ** (1 / 8) = 1e-2 * 0.6876560 = 6.876560e-3
    assert aqn_sigma(25, 100, cfg) == pytest.approx(6.876560e-3, rel=1e-6)
    assert aqn_sigma(95, 100, cfg) == 5e-4  # stage 9: exactly sigma_end
    assert aqn_sigma(99, 100, cfg) == 5e-4
    assert aqn_sigma(250, 100, cfg) == 5e-4  # past the end: stays in the last stage


def test_uneven_stages():
    cfg = AQNConfig(num_stages=4)  # stages of 7 steps: 0 -> 0, 1 -> 1e-2, 2 -> sqrt(1e-2 * 5e-4), 3 -> 5e-4
    # stage = step * 4 // 7
    assert aqn_sigma(1, 7, cfg) == 0.0
    assert aqn_sigma(2, 7, cfg) == 1e-2
    assert aqn_sigma(4, 7, cfg) == pytest.approx(math.sqrt(1e-2 * 5e-4))
    assert aqn_sigma(6, 7, cfg) == 5e-4


@pytest.mark.parametrize(
    "schedule, stage3, stage5",
    [
        # t = (k-1)/8: stage 3 -> t = 0.25, stage 5 -> t = 0.5
        ("exp", 1e-2 * 0.05**0.25, 1e-2 * 0.05**0.5),
        # 1e-2 - 9.5e-3 * t
        ("linear", 7.625e-3, 5.25e-3),
        # 5e-4 + 9.5e-3 * (1 + cos(pi t)) / 2: t = 0.25 -> 5e-4 + 9.5e-3 * 0.8535534 = 8.6087572e-3
        ("cosine", 8.6087572e-3, 5.25e-3),
        # u = ln k / ln 9: k = 3 -> 0.5, so 5.25e-3; k = 5 -> 0.7324868, 1e-2 - 9.5e-3 * u = 3.041376e-3
        ("log", 5.25e-3, 3.041376e-3),
    ],
)
def test_schedule_variants(schedule, stage3, stage5):
    cfg = AQNConfig(schedule=schedule)
    assert aqn_sigma(5, 100, cfg) == 0.0
    assert aqn_sigma(10, 100, cfg) == 1e-2  # endpoints are exact for every variant
    assert aqn_sigma(90, 100, cfg) == 5e-4
    assert aqn_sigma(30, 100, cfg) == pytest.approx(stage3, rel=1e-6)
    assert aqn_sigma(50, 100, cfg) == pytest.approx(stage5, rel=1e-6)
    values = [aqn_sigma(10 * k, 100, cfg) for k in range(1, 10)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decaying


def test_disabled_and_invalid_configs():
    assert aqn_sigma(50, 100, AQNConfig(enabled=False)) == 0.0
    with pytest.raises(ValueError):
        AQNConfig(schedule="step")
    with pytest.raises(ValueError):
        AQNConfig(num_stages=2)
    with pytest.raises(ValueError):
        aqn_sigma(0, 0, AQNConfig())


# --- tiny models -----------------------------------------------------------------

_TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    # Larger than the default 0.02 so that, as in trained models, the attention/MLP
    # outputs (which the noise perturbs) matter next to the token embeddings.
    initializer_range=0.1,
)
_MODELS = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


def _tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    config_cls, model_cls = _MODELS[kind]
    model = model_cls(config_cls(**_TINY)).eval()
    with torch.no_grad():  # real checkpoints' norms are ~1; make the init explicit
        for w in norm_weights(model):
            w.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))  # [B, L]


def _entropy(logits: torch.Tensor) -> float:
    logp = logits.float().log_softmax(-1)  # [B, L, V]
    return -(logp.exp() * logp).sum(-1).mean().item()


def test_norm_weights_selects_decoder_norms_only():
    model = _tiny("qwen2")
    ws = norm_weights(model)
    expected = [
        t for layer in model.model.layers for t in (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    ]
    assert len(ws) == 4 and all(a is b for a, b in zip(ws, expected))
    assert all(w is not model.model.norm.weight for w in ws)
    # PEFT-style wrapping: model.base_model.model.model.layers
    wrapper = nn.Module()
    wrapper.base_model = nn.Module()
    wrapper.base_model.model = model
    assert all(a is b for a, b in zip(norm_weights(wrapper), ws))
    with pytest.raises(ValueError, match="no decoder layers"):
        norm_weights(nn.Linear(4, 4))


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_noise_reaches_logits_and_restores_bit_exactly(kind):
    model = _tiny(kind)
    with torch.no_grad():  # perturb the norms so "restored" means more than "all ones"
        for w in norm_weights(model):
            w.add_(0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(2)))
    originals = [w.clone() for w in norm_weights(model)]
    final_norm = model.model.norm.weight.clone()
    ids = _ids()
    with torch.no_grad():
        clean = model(ids).logits[:, -1]  # [B, V], next-token logits
        with apply_noise(model, 1e-2, torch.Generator().manual_seed(0)) as info:
            assert info == {"sigma": 1e-2, "num_tensors": 4}
            noisy = model(ids).logits[:, -1]
            assert all(not torch.equal(w, o) for w, o in zip(norm_weights(model), originals))
            assert torch.equal(model.model.norm.weight, final_norm)
        after = model(ids).logits[:, -1]
    assert (noisy - clean).abs().max() > 1e-3
    assert all(torch.equal(w, o) for w, o in zip(norm_weights(model), originals))
    assert torch.equal(model.model.norm.weight, final_norm)
    assert torch.equal(after, clean)


def test_noise_is_reproducible_and_fresh_per_tensor():
    model = _tiny("qwen2")
    with apply_noise(model, 1e-2, torch.Generator().manual_seed(3)):
        first = [w.clone() for w in norm_weights(model)]
    with apply_noise(model, 1e-2, torch.Generator().manual_seed(3)):
        second = [w.clone() for w in norm_weights(model)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    deltas = [w - 1.0 for w in first]  # [H] each
    assert all(not torch.equal(a, b) for a, b in zip(deltas, deltas[1:]))  # an independent Z per weight
    assert 0.5e-2 < torch.cat(deltas).std().item() < 2e-2


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_noise_raises_entropy_of_a_confident_model(kind):
    # AQN's premise: noise raises the entropy of a policy that is confident because its
    # hidden states line up with its lm_head rows (as in a trained model); a perturbed
    # hidden state lines up less, the chosen logit drops and the others spread.
    # A random lm_head is not such a policy: its entropy moves up or down at random
    # under noise (checked while writing this test), even when scaled to be peaked.
    # So align the lm_head to the clean final hidden states: token j's row is
    # 8 * x_j / |x_j|^2, giving logit 8 for target j at position j (clean entropy ~1.7-1.8 nats).
    model = _tiny(kind)
    ids = _ids()
    with torch.no_grad():
        x = model.model(ids).last_hidden_state.reshape(-1, 64)  # [B*L, H], after the final norm
        model.lm_head.weight[: x.shape[0]] = 8.0 * x / x.norm(dim=1, keepdim=True) ** 2
        clean = _entropy(model(ids).logits)
        rises = []
        for seed in range(8):
            with apply_noise(model, 0.1, torch.Generator().manual_seed(seed)):
                rises.append(_entropy(model(ids).logits) - clean)
    # Measured: mean rise 0.20 (qwen2) / 0.12 (llama) nats, smallest single rise 0.097.
    assert all(r > 0 for r in rises), rises
    assert sum(rises) / len(rises) > 0.05, rises


def test_restores_on_exception_and_keeps_autograd_state():
    model = _tiny("llama")
    originals = [w.clone() for w in norm_weights(model)]
    params = norm_weights(model)
    with pytest.raises(RuntimeError, match="rollout failed"):
        with apply_noise(model, 0.05, torch.Generator().manual_seed(0)):
            raise RuntimeError("rollout failed")
    assert all(torch.equal(w, o) for w, o in zip(norm_weights(model), originals))
    assert all(a is b for a, b in zip(norm_weights(model), params))  # same Parameter objects
    assert all(w.requires_grad and w.is_leaf and w.grad is None for w in params)


def test_works_under_inference_mode_and_bf16():
    model = _tiny("qwen2").to(torch.bfloat16)
    originals = [w.clone() for w in norm_weights(model)]
    with torch.inference_mode():
        with apply_noise(model, 1e-2, torch.Generator().manual_seed(0)):
            assert all(w.dtype == torch.bfloat16 for w in norm_weights(model))
            assert not all(torch.equal(w, o) for w, o in zip(norm_weights(model), originals))
    assert all(torch.equal(w, o) for w, o in zip(norm_weights(model), originals))


def test_sigma_zero_is_a_no_op():
    model = _tiny("qwen2")
    originals = [w.clone() for w in norm_weights(model)]
    versions = [w._version for w in norm_weights(model)]
    with apply_noise(model, 0.0, torch.Generator()) as info:
        assert info == {"sigma": 0.0, "num_tensors": 0}
        assert all(torch.equal(w, o) for w, o in zip(norm_weights(model), originals))
    assert [w._version for w in norm_weights(model)] == versions  # not even written
    with apply_noise(nn.Linear(2, 2), 0.0, torch.Generator()):  # does not even look for layers
        pass
    with pytest.raises(ValueError):
        with apply_noise(model, -1.0, torch.Generator()):
            pass
