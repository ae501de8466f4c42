"""Token log-probs and entropy of a 152k vocabulary without (N, T, V) float32 tensors.

`grpo.token_logprobs` runs the model's own forward (so FSDP gathers the head's weight and reduce-scatters its
gradient, tied or not) with the LM head swapped for `HeadLogpEntropy`, which hands back [log π(y), entropy] (N, T, 2)
where the (N, T, V) logits would be, computed over chunks of positions. At Qwen2.5's V = 151,936 one float32 (N, T, V)
tensor of an 8 × 768 micro-batch is 3.5 GiB; a chunk is CHUNK_BYTES (benchmarks/bench_logprobs.py measures both).
The idea is TRL's chunked log-prob and Liger's fused linear cross-entropy, written for the tempered log-prob of the
sampled token and its entropy, with a backward that recomputes each chunk's logits.
"""

import contextlib

import torch
import torch.nn.functional as F

CHUNK_BYTES = 2**28  # float32 logits of one chunk of positions (441 at V = 151,936); about twice this is live


@contextlib.contextmanager
def head_returns_logprobs(model, targets, temperature: float, with_entropy: bool):
    """Inside the block, `model`'s LM head maps its hidden states (N, T+1, H) to [logp, entropy] (N, T, 2) of
    `targets` (N, T) under softmax(logits / temperature): position t predicts token t+1, the last one nothing.
    Yields `check(output)`, which refuses a model that transforms its head's output (Gemma-2's soft-capping,
    Cohere's logit scale): log-probs of the untransformed logits would be wrong, silently."""
    head = getattr(model, "module", model).get_output_embeddings()  # through DDP's and DeepSpeed's wrappers
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"token_logprobs: the output embedding of {type(model).__name__} is not an nn.Linear")
    returned = []

    def logp_head(hidden):
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (N*T, H)
        returned.append(HeadLogpEntropy.apply(h, head.weight, head.bias, targets, temperature, with_entropy))
        return returned[-1]

    def check(out):
        if out is not returned[0] and not torch.equal(out, returned[0]):  # DDP may hand back an equal copy
            raise ValueError(f"token_logprobs: {type(model).__name__} transforms the output of its LM head")

    with forward_replaced(head, logp_head):
        yield check


class HeadLogpEntropy(torch.autograd.Function):
    """(N*T, H) hidden states h, (N, T) targets y -> (N, T, 2): log-prob of y and entropy (no gradient; 0 unless
    asked) of softmax(z / τ), z = h Wᵀ + b, over chunks of CHUNK_BYTES of float32 logits. Saves h and W, not z:
    backward recomputes each chunk's z, ∂logp/∂z = (onehot(y) − softmax(z / τ)) / τ, and sums ∂W over chunks in
    float32. The matmuls run in the autocast dtype if autocast is on (as the head's own would), the softmax in
    float32."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, temperature: float, with_entropy: bool):
        device = h.device.type
        ctx.dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        ctx.temperature = temperature
        ctx.save_for_backward(h, weight, bias, targets)
        h, w, b = (None if t is None else t.to(ctx.dtype) for t in (h, weight, bias))
        # (N, T, 2), filled chunk by chunk: not a view, which FSDP2's pre-backward hook would warn about
        out = h.new_zeros(*targets.shape, 2, dtype=torch.promote_types(ctx.dtype, torch.float32))
        for out_c, h_c, y_c in zip(*chunks(w.shape[0], out.view(-1, 2), h, targets.reshape(-1))):
            log_q = tempered_logits(h_c, w, b, temperature)  # (c, V); in place below: no graph in forward
            log_q -= log_q.logsumexp(-1, keepdim=True)
            out_c[:, 0] = log_q.gather(-1, y_c[:, None]).squeeze(-1)
            if with_entropy:
                out_c[:, 1] = -log_q.exp().mul_(log_q).sum(-1)
            del log_q  # before the next chunk's logits: two (c, V) tensors at most
        return out

    @staticmethod
    def backward(ctx, grad_out):  # written in differentiable ops: double backward (HVPs) works through it
        h_in, weight, bias, targets = ctx.saved_tensors
        h, w, b = (None if t is None else t.to(ctx.dtype) for t in (h_in, weight, bias))
        # summed over chunks in float32 also when the weight is bf16 (FSDP2's bf16 all-gather), cast back once
        acc = lambda t: torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32))  # noqa: E731
        grad_w = acc(weight) if ctx.needs_input_grad[1] else None
        grad_b = acc(bias) if ctx.needs_input_grad[2] else None
        grad_h = []
        g = grad_out[..., 0].reshape(-1) / ctx.temperature  # the entropy carries no gradient
        for h_c, y_c, g_c in zip(*chunks(w.shape[0], h, targets.reshape(-1), g)):
            p = tempered_logits(h_c, w, b, ctx.temperature).softmax(-1)  # (c, V)
            dz = (p * -g_c[:, None]).scatter_add_(-1, y_c[:, None], g_c[:, None]).to(w.dtype)  # ∂/∂z (c, V)
            grad_h.append(dz @ w)
            if grad_w is not None and grad_w.dtype == w.dtype:
                grad_w.addmm_(dz.T, h_c)  # in place: no (V, H) temporary
            elif grad_w is not None:
                grad_w += dz.T @ h_c  # a low-precision product, summed in float32
            if grad_b is not None:
                grad_b += dz.sum(0)
            del p, dz  # before the next chunk's logits: two (c, V) tensors at most
        cast = lambda grad, like: None if grad is None else grad.to(like.dtype)  # noqa: E731
        return torch.cat(grad_h).to(h_in.dtype), cast(grad_w, weight), cast(grad_b, bias), None, None, None


def tempered_logits(h, w, b, temperature: float):
    z = F.linear(h, w, b)  # (c, V); its backward keeps no output, so it may be divided in place
    return z.to(torch.promote_types(z.dtype, torch.float32)).div_(temperature)  # bf16 -> fp32


def chunks(vocab: int, *row_tensors):
    """Each tensor split into the same chunks of rows, CHUNK_BYTES of float32 logits each."""
    rows = max(1, CHUNK_BYTES // (4 * vocab))
    return [t.split(rows) for t in row_tensors]


@contextlib.contextmanager
def forward_replaced(module: torch.nn.Module, forward):
    """`module(x)` calls `forward(x)` inside the block (hooks still run), its own forward again after it."""
    own = vars(module).get("forward")  # an instance attribute already (e.g. accelerate's hooks), or None
    module.forward = forward
    try:
        yield
    finally:
        if own is None:
            del module.forward  # the class's forward shows through again
        else:
            module.forward = own
