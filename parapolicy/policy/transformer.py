"""TransformerForDiffusion: Diffusion Policy's transformer denoiser (Chi et al., "DP-T"), in plain torch.

The noisy action sequence is a sequence of tokens (one per horizon step). With ``time_as_cond`` (the
default) a pre-norm transformer *decoder* reads them, cross-attending to a short condition sequence:
the diffusion timestep's sinusoidal embedding, then (``obs_as_cond``) one token per observation step,
passed through an MLP (``n_cond_layers == 0``) or a transformer encoder (``n_cond_layers > 0``). Without
``time_as_cond`` it is an encoder-only ("BERT") stack whose first token is the timestep. ``causal_attn``
lets action token i attend to tokens 0..i only, and, with observation tokens, to observation steps
0..i (plus the time token).

State-dict keys are Diffusion Policy's (``input_emb``, ``pos_emb``, ``cond_obs_emb``, ``cond_pos_emb``,
``encoder.*``, ``decoder.layers.*``, ``ln_f``, ``head``), so a DP workspace's weights load as they are.
DP also saves its additive ``mask`` / ``memory_mask`` buffers (``causal_attn``); here they are the same
buffers, rebuilt from the options and not saved (``DP_BUFFERS``: what an importer checks and drops).

Inside a ``DiffusionPolicy`` the network keeps the U-Net's interface, ``forward(sample [B, H, D],
timestep [B], global_cond [B, G]) -> [B, H, D]``, and maps the flat conditioning itself:

- ``obs_as_cond``: ``global_cond`` is the observation features, step-major, ``[B, T_obs * cond_dim]``;
  they become the ``[B, T_obs, cond_dim]`` condition tokens.
- otherwise (DP's ``obs_as_cond=False``) the sampled sequence carries the observation features in its
  last ``inpaint_dim`` channels (D = action_dim + inpaint_dim) and DP imposes the clean features on the
  first T_obs steps before every model evaluation. The network does that itself, from ``global_cond``:
  every denoising step in our samplers is elementwise in the sample (DDPM, DDIM, their Picard and
  Anderson solves), so imposing inside the model gives the action channels exactly DP's trajectory;
  only the imposed channels of the sampler's state differ, and they are never read.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from parapolicy.policy.unet import row_timesteps


DP_BUFFERS = ("mask", "memory_mask")  # in DP's state dict under causal_attn, not in ours


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    """bool ``[T, S]`` (True: may attend) -> float mask, 0 where allowed and -inf elsewhere (DP's buffers)."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


class TimestepEmbedding(nn.Module):
    """Timestep ``[B]`` -> ``[B, dim]``: sin then cos of ``t * 10000^(-i / (dim/2 - 1))`` (DP's
    SinusoidalPosEmb, frequencies computed in the same order so float32 results agree bit for bit)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError(f"n_emb must be even and >= 4, got {dim}")
        half = dim // 2
        freqs = torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))
        self.register_buffer("freqs", freqs, persistent=False)  # moves with .to(); not in the state dict

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class MultiheadAttention(nn.Module):
    """Scaled dot-product attention with torch.nn.MultiheadAttention's parameter names (``in_proj_weight``
    ``[3E, E]`` = query, key, value projections; ``out_proj``), batch first, additive float mask."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"n_emb {dim} must be divisible by n_head {heads}")
        self.heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """query ``[B, T, E]``, memory ``[B, S, E]`` (``query`` itself for self-attention), mask ``[T, S]``
        or None -> ``[B, T, E]``. Projections packed as torch's MultiheadAttention packs them (one map for
        self-attention, query then key + value for cross-attention) and the same fused attention kernel,
        so float32 results are torch's (and DP's) bit for bit."""
        batch, length, dim = query.shape
        if memory is query:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            w_q, w_kv = self.in_proj_weight.split([dim, 2 * dim])
            b_q, b_kv = self.in_proj_bias.split([dim, 2 * dim])
            q = F.linear(query, w_q, b_q)
            k, v = F.linear(memory, w_kv, b_kv).chunk(2, dim=-1)

        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, N, E] -> [B, heads, N, E / heads]
            return x.reshape(batch, x.shape[1], self.heads, dim // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v),
                                             attn_mask=None if mask is None else mask.to(q.dtype),
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class EncoderLayer(nn.Module):
    """Pre-norm self-attention layer (torch.nn.TransformerEncoderLayer(norm_first=True, gelu) names)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, heads, dropout)
        self.linear1, self.linear2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)  # after the GELU
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)  # on each residual branch

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.gelu(self.linear1(x))))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.dropout1(self.self_attn(h, h, mask))
        return x + self.dropout2(self.feed_forward(self.norm2(x)))


class DecoderLayer(EncoderLayer):
    """Pre-norm decoder layer: self-attention, cross-attention to ``memory`` (``multihead_attn``), MLP
    (torch.nn.TransformerDecoderLayer(norm_first=True, gelu) names)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__(dim, heads, dropout)
        self.multihead_attn = MultiheadAttention(dim, heads, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.dropout1(self.self_attn(h, h, mask))
        x = x + self.dropout2(self.multihead_attn(self.norm2(x), memory, memory_mask))
        return x + self.dropout3(self.feed_forward(self.norm3(x)))


class _Stack(nn.Module):
    """``layers.0 ... layers.{n-1}`` applied in turn (torch.nn.TransformerEncoder / Decoder without a final norm)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, *args)
        return x


class TransformerForDiffusion(nn.Module):
    """DP's transformer denoiser (see the module docstring).

    input_dim / output_dim: channels of the sampled sequence (actions, plus ``inpaint_dim`` observation
    channels without ``obs_as_cond``); horizon: token count (positional embeddings) of the sequence;
    n_obs_steps: observation steps; cond_dim: features per observation token, > 0 means ``obs_as_cond``
    (as in DP, which derives it so); inpaint_dim: observation channels imposed from ``global_cond`` on
    the first n_obs_steps tokens (only without ``obs_as_cond``).
    """

    def __init__(self, input_dim: int, output_dim: int, horizon: int, n_obs_steps: int | None = None,
                 cond_dim: int = 0, n_layer: int = 12, n_head: int = 12, n_emb: int = 768,
                 p_drop_emb: float = 0.1, p_drop_attn: float = 0.1, causal_attn: bool = False,
                 time_as_cond: bool = True, n_cond_layers: int = 0, inpaint_dim: int = 0):
        super().__init__()
        n_obs_steps = horizon if n_obs_steps is None else n_obs_steps
        self.obs_as_cond = cond_dim > 0
        if self.obs_as_cond and not time_as_cond:
            raise ValueError("observation tokens (cond_dim > 0) need time_as_cond=True, as in Diffusion Policy")
        if self.obs_as_cond and inpaint_dim:
            raise ValueError("inpaint_dim is for obs_as_cond=False (cond_dim 0) only")
        if not 0 <= inpaint_dim < input_dim or output_dim != input_dim and inpaint_dim:
            raise ValueError(f"inpaint_dim must lie in [0, input_dim={input_dim}) with output_dim == input_dim")
        tokens = horizon + (0 if time_as_cond else 1)  # encoder-only: the timestep is token 0
        cond_tokens = (1 + (n_obs_steps if self.obs_as_cond else 0)) if time_as_cond else 0
        self.horizon, self.n_obs_steps, self.cond_dim, self.inpaint_dim = horizon, n_obs_steps, cond_dim, inpaint_dim
        self.time_as_cond, self.tokens, self.cond_tokens = time_as_cond, tokens, cond_tokens

        self.input_emb = nn.Linear(input_dim, n_emb)
        self.pos_emb = nn.Parameter(torch.zeros(1, tokens, n_emb))
        self.drop = nn.Dropout(p_drop_emb)
        self.time_emb = TimestepEmbedding(n_emb)
        self.cond_obs_emb = nn.Linear(cond_dim, n_emb) if self.obs_as_cond else None
        self.cond_pos_emb = None
        self.decoder = None
        if time_as_cond:
            self.cond_pos_emb = nn.Parameter(torch.zeros(1, cond_tokens, n_emb))
            if n_cond_layers > 0:
                self.encoder = _Stack([EncoderLayer(n_emb, n_head, p_drop_attn) for _ in range(n_cond_layers)])
            else:
                self.encoder = nn.Sequential(nn.Linear(n_emb, 4 * n_emb), nn.Mish(), nn.Linear(4 * n_emb, n_emb))
            self.decoder = _Stack([DecoderLayer(n_emb, n_head, p_drop_attn) for _ in range(n_layer)])
        else:
            self.encoder = _Stack([EncoderLayer(n_emb, n_head, p_drop_attn) for _ in range(n_layer)])

        # Derived from the options, so kept out of our checkpoints (whose loader refuses -inf); DP's state
        # dict carries them, and the importer checks they equal these.
        mask = memory_mask = None
        if causal_attn:
            steps = torch.arange(tokens)
            mask = _additive(steps[:, None] >= steps[None, :])  # a token sees itself and earlier ones
            if self.obs_as_cond:
                # condition token 0 is the timestep, token s >= 1 observation step s - 1: action token i
                # sees the timestep and observation steps 0..i
                cond = torch.arange(cond_tokens)
                memory_mask = _additive(steps[:, None] >= cond[None, :] - 1)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("memory_mask", memory_mask, persistent=False)
        self.ln_f = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, output_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """DP's initialisation: N(0, 0.02) for Linear and attention projections and the positional
        embeddings, zero biases, unit LayerNorms (only matters for training from scratch)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, MultiheadAttention):
                nn.init.normal_(module.in_proj_weight, std=0.02)
                nn.init.zeros_(module.in_proj_bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos_emb, std=0.02)
        if self.cond_obs_emb is not None:
            nn.init.normal_(self.cond_pos_emb, std=0.02)

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """DP's AdamW parameter groups: Linear and attention weights decay; biases, LayerNorms and the
        positional embeddings do not."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            owner = self.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self
            if leaf == "in_proj_weight" or (leaf == "weight" and isinstance(owner, nn.Linear)):
                decay.append(param)
            else:
                no_decay.append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # ------------------------------------------------------------------ forward
    def forward_tokens(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """DP's forward: sample ``[B, T, input_dim]``, timestep ``[B]``, cond ``[B, n_obs_steps, cond_dim]``
        (``obs_as_cond`` only) -> ``[B, T, output_dim]``."""
        time = self.time_emb(timestep).to(sample.dtype)[:, None]  # [B, 1, E]
        x = self.input_emb(sample)
        length = x.shape[1]
        if self.mask is not None and length != self.horizon:
            raise ValueError(f"causal attention needs {self.horizon} tokens (its mask's size), got {length}")
        if not self.time_as_cond:  # encoder only: [time, actions] -> drop the time token again
            x = self.drop(torch.cat([time, x], dim=1) + self.pos_emb[:, : length + 1])
            x = self.encoder(x, self.mask)[:, 1:]
        else:
            memory = time
            if self.obs_as_cond:
                memory = torch.cat([time, self.cond_obs_emb(cond)], dim=1)
            memory = self.encoder(self.drop(memory + self.cond_pos_emb[:, : memory.shape[1]]))
            x = self.drop(x + self.pos_emb[:, :length])
            x = self.decoder(x, memory, self.mask, self.memory_mask)
        return self.head(self.ln_f(x))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, global_cond: torch.Tensor | None = None) -> torch.Tensor:
        """DiffusionPolicy's interface: sample ``[B, H, input_dim]``, timestep ``[B]``, ``[]`` or int,
        global_cond ``[B, n_obs_steps * cond_dim]`` (``obs_as_cond``), ``[B, n_obs_steps * inpaint_dim]``
        (imposed on the first steps' last channels) or None -> ``[B, H, output_dim]``."""
        batch = sample.shape[0]
        timestep = row_timesteps(timestep, batch, sample.device)
        cond = None
        if self.obs_as_cond:
            cond = global_cond.reshape(batch, self.n_obs_steps, self.cond_dim)
        elif self.inpaint_dim:
            sample = self.impose_observations(sample, global_cond)
        return self.forward_tokens(sample, timestep, cond)

    def impose_observations(self, sample: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        """``sample`` ``[B, H, A + inpaint_dim]`` with its first ``n_obs_steps`` steps' observation channels
        replaced by ``global_cond`` ``[B, n_obs_steps * inpaint_dim]`` (DP's condition mask); a new tensor."""
        batch, steps, width = sample.shape[0], self.n_obs_steps, self.inpaint_dim
        obs = global_cond.reshape(batch, steps, width).to(sample.dtype)
        head = torch.cat([sample[:, :steps, : sample.shape[2] - width], obs], dim=2)
        return torch.cat([head, sample[:, steps:]], dim=1)
