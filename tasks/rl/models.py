"""The decision transformer: transformers' ``DecisionTransformerModel`` (a GPT-2 of Conv1D blocks).

Tokens per timestep, interleaved: (return-to-go, state, action), so the blocks see ``3 * context`` rows per window.
Sizes come from config: the paper's (EVA v5, RL: 4 layers, 8 heads, hidden 512, context 50) or the CPU default's.
The library's model is used as is: the shared initializer already adapts GPT-2 Conv1D layers, and PEFT saves and
loads it like any Hugging Face model.

Calibration callbacks (what the shared initializer sees of RL batches):
- ``forward``: the model on one window batch;
- ``loss``: action MSE on real timesteps (padding excluded);
- ``rows``: the (batch, 3 * steps) mask of token rows that are real: each timestep's mask repeated for its three
  interleaved tokens.
"""

from __future__ import annotations

import torch
from transformers import DecisionTransformerConfig, DecisionTransformerModel

from eva_bench.distributed import to_device

BLOCK_LAYERS = r".*\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"  # the GPT-2 blocks' Conv1D layers
# (the embeddings and heads see (batch, steps) rows, not the blocks' (batch, 3 * steps): adapters go on the blocks)


def decision_transformer(*, state_dim: int, act_dim: int, hidden: int, layers: int, heads: int, context: int,
                         max_episode_steps: int, dropout: float = 0.1, activation: str = "relu") -> DecisionTransformerModel:
    config = DecisionTransformerConfig(
        state_dim=state_dim, act_dim=act_dim, hidden_size=hidden, n_layer=layers, n_head=heads,
        n_inner=4 * hidden, max_ep_len=max_episode_steps, n_positions=3 * context, action_tanh=True,
        activation_function=activation, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )
    return DecisionTransformerModel(config)


def forward(model, batch: dict) -> torch.Tensor:
    """Predicted actions (B, K, act_dim) for a window batch."""
    out = model(
        states=batch["states"], actions=batch["actions"], returns_to_go=batch["returns_to_go"],
        timesteps=batch["timesteps"], attention_mask=batch["attention_mask"], return_dict=True,
    )
    return out.action_preds


def action_loss(model, batch: dict) -> torch.Tensor:
    """Mean squared action error over real (unpadded) timesteps."""
    mask = batch["attention_mask"].bool()
    error = (forward(model, batch) - batch["actions"]) ** 2
    return error.mean(-1)[mask].mean()


@torch.no_grad()
def mean_action_loss(model, windows, batch_size: int = 256) -> float:
    """``action_loss`` over every window of ``windows`` (a SequenceDataset), weighted by real timesteps, in eval mode:
    the tuned protocol's validation score on held-out episodes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = to_device(windows.batch(range(start, min(start + batch_size, len(windows)))), device)
        timesteps = int(batch["attention_mask"].sum())
        total += float(action_loss(model, batch)) * timesteps  # action_loss is the batch's per-timestep mean
        count += timesteps
    model.train(was_training)
    return total / count


def token_rows(batch: dict) -> torch.Tensor:
    """(B, 3K) mask: a timestep's mask for its return, state and action tokens, in the model's interleaved order."""
    return batch["attention_mask"].repeat_interleave(3, dim=1)
