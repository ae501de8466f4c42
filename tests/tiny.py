"""Tiny randomly-initialised HF models of real architectures, built from configs (no hub)."""

import types

import torch
from transformers import (AttentionInterface, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)
from transformers.masking_utils import AttentionMaskInterface, eager_mask

VOCAB = 48


def exact_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """HF's eager attention without its float32 softmax, so float64 models are float64 throughout."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(2, 3) * scaling + attention_mask  # causal and padding, from eager_mask
    weights = scores.softmax(-1)
    return (weights @ value).transpose(1, 2).contiguous(), weights


AttentionInterface.register("exact", exact_attention)
AttentionMaskInterface.register("exact", eager_mask)  # without a mask function of its own HF would pass no mask at all


def exact_rms_norm(self, x):
    """Qwen2/Llama RMSNorm without the round trip through float32."""
    return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def tiny_model(arch: str = "qwen2", *, tie: bool = False, dtype=torch.float32, seed: int = 0, layers: int = 2,
               exact: bool = False):
    """exact=True: no float32 islands inside a float64 model (for finite-difference tests)."""
    torch.manual_seed(seed)
    attn = "exact" if exact else "sdpa"
    common = dict(vocab_size=VOCAB, tie_word_embeddings=tie, attn_implementation=attn, bos_token_id=2,
                  eos_token_id=1, pad_token_id=0)
    if arch == "qwen2":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, **common)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, **common)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                            max_position_embeddings=128, **common)
        model = GPTNeoXForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=128, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    # random init is tiny (std 0.02): scale up so the loss surface has real curvature
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    if exact:
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.forward = types.MethodType(exact_rms_norm, m)
    return model.to(dtype).eval()


def rollout_batch(n: int = 6, prompt_len: int = 5, completion_len: int = 7, group: int = 3, seed: int = 1,
                  left_pad: bool = True, device="cpu"):
    """A fixed batch as the trainer builds it: left-padded prompts, right-padded completions, advantages."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, VOCAB, (n, prompt_len), generator=g)
    prompt_mask = torch.ones(n, prompt_len, dtype=torch.long)
    for i in range(n if left_pad else 0):  # uneven left padding
        prompt_mask[i, : i % 3] = 0
        prompt[i, : i % 3] = 0
    completion = torch.randint(1, VOCAB, (n, completion_len), generator=g)
    completion_mask = torch.ones(n, completion_len, dtype=torch.long)
    for i in range(n):  # uneven completion lengths
        completion_mask[i, completion_len - (i % 4):] = 0
    completion = completion * completion_mask
    rewards = torch.rand(n, generator=g)
    adv = rewards.view(-1, group) - rewards.view(-1, group).mean(1, keepdim=True)
    return {"input_ids": torch.cat([prompt, completion], 1).to(device),
            "attention_mask": torch.cat([prompt_mask, completion_mask], 1).to(device),
            "completion_mask": completion_mask.to(device),
            "advantages": adv.view(-1).to(device)}


@torch.no_grad()
def greedy_continuation(model, prompt_ids: torch.Tensor, max_new_tokens: int, eos_token_ids) -> list[int]:
    """Greedy tokens after a 1-D prompt, the whole sequence through the model at every step (no cache, no padding,
    no batch), up to and including the first EOS."""
    ids, new = prompt_ids[None], []
    while len(new) < max_new_tokens and (not new or new[-1] not in eos_token_ids):
        new.append(model(ids).logits[0, -1].argmax().item())
        ids = torch.cat([ids, torch.tensor([[new[-1]]])], 1)
    return new
