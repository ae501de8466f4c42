"""GR inside Hugging Face TRL's GRPOTrainer: every optimizer step takes gr.gr_backward's gradient.

TRL's trainer runs forward + backward once per micro-batch and steps the optimizer after the last one. GR needs the
whole step's gradient twice (at φ and at φ + ε·g1), so this subclass holds the step's micro-batches and, at the last
one, runs gr.gr_backward with a closure over all of them; the Trainer then clips (max_grad_norm) and steps as usual.
Tested in one process (tests/test_trl.py); under Accelerate's DDP, FSDP1 or FSDP2 the Trainer hands it the
wrapped model, which gr.py handles (tests/test_wrappers.py), and a DeepSpeed engine is refused by gr.py.

    trainer = GRGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(loss_type="dr_grpo", scale_rewards="none",
                            ...), train_dataset=..., gr_gamma=1e-2, gr_eps=1e-3)
    trainer.train()

The paper's recipe on TRL: loss_type="dr_grpo", scale_rewards="none" (Dr.GRPO), max_grad_norm=1.0, and γ, ε as in
App. C. The second pass calls TRL's compute_loss again, so TRL's per-micro-batch metrics (entropy, clip ratios) are
logged for both passes; gr/* metrics are added once per step.
"""

import contextlib
import sys
from pathlib import Path

import torch
from trl import GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # gr.py: copied next to this file in your project
import gr  # noqa: E402


class GRGRPOTrainer(GRPOTrainer):
    def __init__(self, *args, gr_gamma: float, gr_eps: float = 1e-3, **kwargs):
        super().__init__(*args, **kwargs)
        self.gr_gamma, self.gr_eps = gr_gamma, gr_eps
        self._step_inputs = []  # this optimizer step's micro-batches so far

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        self._step_inputs.append(self._prepare_inputs(inputs))  # generates on TRL's schedule, which reads _step
        self._step += 1  # what GRPOTrainer.training_step counts
        if len(self._step_inputs) < self.current_gradient_accumulation_steps:
            return torch.zeros((), device=self.accelerator.device)  # no backward yet: the loss is logged at the last
        step_inputs, self._step_inputs = self._step_inputs, []

        def closure():
            total = torch.zeros((), device=self.accelerator.device)
            for i, mb in enumerate(step_inputs):
                last = i == len(step_inputs) - 1  # DDP: all-reduce once, after the last micro-batch
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    with self.compute_loss_context_manager():
                        loss = self.compute_loss(model, mb)  # already divided by the accumulation steps
                    self.accelerator.backward(loss)
                total += loss.detach()
            return total

        out = gr.gr_backward(model, closure, gamma=self.gr_gamma, eps=self.gr_eps)
        for k in ("g1_norm", "g2_norm", "correction_norm", "correction_ratio"):
            self._metrics["train"][f"gr/{k}"].append(out[k])
        return out["loss"]
