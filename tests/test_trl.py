"""examples/trl_gr.py: one step of TRL's GRPOTrainer with GR == grpo.train_step(reg="gr") on the batch TRL generated.

TRL is a test dependency (requirements.txt); the project itself never imports it. Tiny float64 Qwen2 with no float32
islands, a word-level tokenizer and a reward written here, all offline. TRL's Dr.GRPO settings match ours:
loss_type="dr_grpo" (normaliser: sequences × max_completion_length), scale_rewards="none" (A = r − group mean),
beta=0 (use_bias_correction_kl=False), the same temperature and max_grad_norm; prompts of one length (TRL passes no
position ids, ours count from the first unpadded token: the same without left padding).

TRL computes log-probabilities in float32 whatever the model's dtype (its fused LM head), and GR multiplies the noise
in g2 − g1 by γ/ε: measured 1.7e-6 relative at γ/ε = 10 (here), 1.4e-5 at γ/ε = 100.
"""

import copy
import sys
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, TrainerCallback
from trl import GRPOConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import grpo  # noqa: E402
from tiny import VOCAB, tiny_model  # noqa: E402
from trl_gr import GRGRPOTrainer  # noqa: E402

PROMPTS, GENERATIONS, MAX_LEN, TEMPERATURE = 2, 4, 6, 0.7
GAMMA, EPS = 1e-2, 1e-3


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


def reward(completion_ids, **kwargs) -> list[float]:
    """Share of the completion's tokens from the lower half of the vocabulary."""
    return [sum(t < VOCAB // 2 for t in ids) / max(len(ids), 1) for ids in completion_ids]


class Capture(GRGRPOTrainer):
    """Keeps the generated batch (before TRL shuffles it into micro-batches) and the gradient the optimizer steps on."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.generated = {k: v.clone() for k, v in out.items() if isinstance(v, torch.Tensor)}
        return out


class GradientAtStep(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # after the Trainer's clip
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}


class Recorder:
    """An optimizer that only records the gradient train_step hands it (after its clip)."""

    def __init__(self, model):
        self.model = model

    def step(self):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def our_gradient(model, batch: dict, reg: str) -> dict:
    rec = Recorder(model)
    grpo.train_step(model, rec, batch, reg=reg, temperature=TEMPERATURE, normalizer=PROMPTS * GENERATIONS * MAX_LEN,
                    micro_batch_size=GENERATIONS, gamma=GAMMA, eps=EPS, max_grad_norm=1.0)
    return rec.grads


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


def test_one_trl_gr_step_equals_train_step(tmp_path):
    model = tiny_model(dtype=torch.float64, exact=True)
    initial = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(f"w{t}" for t in torch.randint(3, VOCAB, (4,), generator=g).tolist()) for _ in range(PROMPTS)]
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, seed=0, max_steps=1, learning_rate=1e-3,
                      per_device_train_batch_size=GENERATIONS, gradient_accumulation_steps=PROMPTS,
                      num_generations=GENERATIONS, max_completion_length=MAX_LEN, temperature=TEMPERATURE,
                      loss_type="dr_grpo", scale_rewards="none", beta=0.0, use_bias_correction_kl=False,
                      max_grad_norm=1.0, report_to="none", save_strategy="no", logging_steps=1)
    capture = GradientAtStep()
    trainer = Capture(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
                      processing_class=word_tokenizer(), callbacks=[capture], gr_gamma=GAMMA, gr_eps=EPS)
    trainer.train()

    b = trainer.generated
    assert b["prompt_mask"].all()  # no left padding: TRL's positions are ours
    rewards = torch.tensor(reward([ids[m.bool()].tolist() for ids, m in zip(b["completion_ids"],
                                                                              b["completion_mask"])]))
    advantages = grpo.group_advantages(rewards.double(), GENERATIONS)
    torch.testing.assert_close(b["advantages"].double(), advantages)  # TRL's Dr.GRPO advantages are ours
    assert advantages.abs().max() > 0.05
    batch = {"input_ids": torch.cat([b["prompt_ids"], b["completion_ids"]], 1),
             "attention_mask": torch.cat([b["prompt_mask"], b["completion_mask"]], 1),
             "completion_mask": b["completion_mask"], "advantages": advantages}
    ours = flat(our_gradient(copy.deepcopy(initial), batch, "gr"))
    plain = flat(our_gradient(copy.deepcopy(initial), batch, "none"))
    trl = flat(capture.grads)
    assert (ours - plain).norm() > 0.02 * plain.norm()  # GR's correction (8.9% here) is far above the tolerance
    assert (trl - ours).norm() <= 1e-5 * ours.norm(), ((trl - ours).norm() / ours.norm()).item()
