"""Chunked token log-probs (grpo.token_logprobs over logprobs.py) against a full log-softmax over (N, T, V) written out
here: values, entropy and every parameter's gradient in float64, with left padding, temperature ≠ 1, tied, untied and
biased heads and several chunks; double backward; bf16 autocast; FSDP2 on 2 gloo ranks == one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

import logprobs
from grpo import token_logprobs
from tiny import VOCAB, rollout_batch, tiny_model

TAU = 0.7
ROWS = 5  # positions per chunk: 6 × 7 completion positions -> 9 chunks, the last one short, boundaries mid-sequence


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 4 * VOCAB * ROWS)


def full_log_softmax(model, batch, temperature, dtype=torch.float64):
    """(N, T) log-probs and entropies in `dtype` from the (N, P+T, V) logits of one plain forward (no
    logits_to_keep)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    T = batch["completion_mask"].shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    z = logits[:, -T - 1:-1].to(dtype) / temperature  # position t predicts token t+1
    z = z - z.amax(-1, keepdim=True)  # exp cannot overflow
    log_q = z - z.exp().sum(-1, keepdim=True).log()
    logp = log_q.gather(-1, ids[:, -T:, None]).squeeze(-1)
    return logp, -(log_q.exp() * log_q).sum(-1)


def grads_of(model, fn, weights, autocast=False):
    """logp, entropy and every parameter's gradient of Σ weights·logp; the backward outside autocast, as on CUDA,
    where autograd's threads run it."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logp, entropy = fn()
    (weights * logp).sum().backward()
    return logp.detach(), entropy, {k: p.grad.clone() for k, p in model.named_parameters()}


def biased_head(model):
    """A head with a bias (none of the tiny architectures has one)."""
    head = torch.nn.Linear(32, VOCAB, bias=True, dtype=torch.float64)
    torch.nn.init.normal_(head.weight, 0, 0.3)
    torch.nn.init.normal_(head.bias, 0, 1.0)
    model.lm_head = head
    return model


MODELS = {"qwen2-untied": lambda: tiny_model("qwen2", dtype=torch.float64, exact=True),
          "qwen2-tied": lambda: tiny_model("qwen2", tie=True, dtype=torch.float64, exact=True),
          "gpt_neox-embed_out": lambda: tiny_model("gpt_neox", dtype=torch.float64, exact=True),
          "gpt2-tied": lambda: tiny_model("gpt2", tie=True, dtype=torch.float64, exact=True),
          "qwen2-biased_head": lambda: biased_head(tiny_model("qwen2", dtype=torch.float64, exact=True))}


@pytest.mark.parametrize("name", MODELS)
def test_values_entropy_and_gradients_equal_full_log_softmax_in_float64(name):
    model = MODELS[name]()
    batch = rollout_batch()  # left-padded prompts, right-padded completions
    T = batch["completion_mask"].shape[1]
    weights = torch.randn(batch["completion_mask"].shape, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logp, entropy, grads = grads_of(model, lambda: token_logprobs(model, ids, mask, T, TAU, with_entropy=True),
                                    weights)
    ref_logp, ref_entropy, ref_grads = grads_of(model, lambda: full_log_softmax(model, batch, TAU), weights)
    assert logp.dtype == entropy.dtype == torch.float64 and not entropy.requires_grad
    torch.testing.assert_close(logp, ref_logp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for k in grads:  # the tied weight's gradient is the head's and the embedding's together
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-10, atol=1e-12, msg=k)
    assert "forward" not in vars(model.get_output_embeddings())  # the head is itself again
    with torch.no_grad():  # reference_logprobs and eval: same values, no graph
        logp_ng, entropy_ng = token_logprobs(model, ids, mask, T, TAU)
    assert entropy_ng is None and not logp_ng.requires_grad
    torch.testing.assert_close(logp_ng, ref_logp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tie", [False, True])
def test_double_backward_gives_the_full_log_softmax_hessian_vector_product(tie):
    """gr_precision.py and test_gr.py's reference differentiate the gradient again (create_graph=True)."""
    model = tiny_model("qwen2", tie=tie, dtype=torch.float64, exact=True)
    batch = rollout_batch()
    T = batch["completion_mask"].shape[1]
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]

    def hvp(fn):
        grads = torch.autograd.grad((batch["advantages"][:, None] * fn()).sum(), params, create_graph=True)
        return torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), params)

    got = hvp(lambda: token_logprobs(model, batch["input_ids"], batch["attention_mask"], T, TAU)[0])
    expected = hvp(lambda: full_log_softmax(model, batch, TAU)[0])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_bf16_autocast_agrees_with_the_full_log_softmax_to_bf16_precision():
    """Under autocast the head's matmul runs in bf16, as the model's own head would (not in float32)."""
    model = tiny_model("qwen2", tie=True)  # float32 master weights
    batch = rollout_batch()
    T = batch["completion_mask"].shape[1]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    weights = batch["completion_mask"].float()
    run = lambda: token_logprobs(model, ids, mask, T, TAU, with_entropy=True)  # noqa: E731
    f32 = torch.float32
    logp, entropy, grads = grads_of(model, run, weights, autocast=True)
    ref_logp, ref_entropy, ref_grads = grads_of(model, lambda: full_log_softmax(model, batch, TAU, f32), weights,
                                                autocast=True)
    fp32_logp, _, fp32_grads = grads_of(model, lambda: full_log_softmax(model, batch, TAU, f32), weights)
    assert all(g.dtype == torch.float32 for g in grads.values())
    bf16_error = (fp32_logp - ref_logp).abs().max()
    assert (logp - ref_logp).abs().max() < 0.1 * bf16_error  # the same bf16 logits, not float32 ones
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-5)
    for k in grads:  # bf16 products: the chunked head sums them in float32, the full one rounds one product to bf16
        err = (grads[k] - ref_grads[k]).norm() / ref_grads[k].norm()
        assert err < 0.1 * (fp32_grads[k] - ref_grads[k]).norm() / ref_grads[k].norm() + 1e-6, k


def test_a_model_that_transforms_its_head_output_is_refused():
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=30.0)
    model = Gemma2ForCausalLM(cfg)
    batch = rollout_batch()
    with pytest.raises(ValueError, match="transforms the output of its LM head"):
        token_logprobs(model, batch["input_ids"], batch["attention_mask"], 7, TAU)
    assert "forward" not in vars(model.lm_head)


WORKER = Path(__file__).parent / "logprobs_worker.py"


def test_fsdp2_two_ranks_give_the_gradients_of_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(WORKER), str(tmp_path / "result.pt")], check=True, env=env, timeout=300)
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    for head in ("untied", "tied"):
        single, sharded = result[head]
        assert single.keys() == sharded.keys()
        for k in single:
            torch.testing.assert_close(sharded[k], single[k], rtol=1e-10, atol=1e-12, msg=f"{head} {k}")
        assert single["model.embed_tokens.weight"].abs().max() > 0


def test_benchmark_runs():
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_logprobs.py"
    out = subprocess.run([sys.executable, str(bench), "--n", "2", "--prompt-len", "4", "--completion-len", "8",
                          "--vocab", "1000", "--layers", "1"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    for variant in ("before", "after"):
        assert f"\n{variant} " in out.stdout and "GiB" in out.stdout
    assert "before / after: memory" in out.stdout

