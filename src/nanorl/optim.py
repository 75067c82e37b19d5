"""Optimizers: Muon for the transformer's matrices, AdamW for the embedding and the output head (as nanochat).

    opt = Optimizers(model, cfg.optim, lr_mult=stage.lr)   # groups from model.param_groups()
    opt.set_lr(lr_schedule(step, steps, stage))             # every step, before opt.step()
    grad_norm = opt.step()                                  # clips (optim.grad_clip), steps both, zeroes grads

Muon (Jordan et al. 2024, "Muon: MomentUm Orthogonalized by Newton-schulz") keeps SGD momentum per matrix and
replaces each update by the nearest semi-orthogonal matrix, computed approximately with a few Newton-Schulz
iterations. That equalises the update's singular values, so every direction of a matrix learns at the same
rate. Embeddings and the unembedding are not matrices in that sense (a row is looked up, not multiplied), so
they keep AdamW.

With several ranks the stages average the gradients across ranks before `step` (`stages.common.sync_grads`), so
every rank takes the identical step and the weights stay in sync without further communication.

Optimizer state is exported flat (`state_tensors()` / `load_state_tensors()`): name -> tensor, so a checkpoint
stores it in safetensors and loading never unpickles anything.
"""

from __future__ import annotations

import math

import torch

# Newton-Schulz quintic coefficients (a, b, c) from Keller Jordan's Muon write-up (also used by nanochat): they
# push the singular values of the normalised matrix towards ~1 in 5 iterations rather than converging exactly,
# which is all Muon needs. Measured on the quintic in float64 (tests/test_optim.py): a singular value at least
# 1% of the matrix's Frobenius norm comes out in 0.68..1.14, none above 1.21; a smaller one stays smaller
# (1e-3 of the norm -> 0.47), so a gradient's weakest directions are not raised to full size.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5

# nanochat scales the AdamW learning rates by (d_model / 768) ** -0.5: its rates were tuned at width 768, and
# an embedding row's effective step size should shrink as the model widens.
ADAM_REFERENCE_WIDTH = 768


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximately U·Vᵀ of g = U·S·Vᵀ (the nearest semi-orthogonal matrix), by Newton-Schulz iteration.

    Works on the wide orientation (rows <= cols) so the X·Xᵀ products are the small ones. bfloat16 on CUDA
    (the iteration is robust to it and it is ~2x faster); float32 elsewhere, where bf16 matmuls are slow.
    """
    a, b, c = NS_COEFFS
    dtype = torch.bfloat16 if g.is_cuda else torch.float32
    x = g.to(dtype)
    single = x.ndim == 2  # one matrix, or a batch of them (..., rows, cols)
    x = x.reshape(-1, *x.shape[-2:])
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = x @ x.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b·A + c·A·A, one pass
        x = torch.baddbmm(x, B, x, beta=a)  # a·x + B·x
    if tall:
        x = x.mT
    return (x[0] if single else x.reshape(g.shape)).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """SGD-momentum (Nesterov) whose update of each 2-D parameter is orthogonalised.

    The update is scaled by sqrt(max(1, rows/cols)) so that tall matrices (the MLP's down projection read as
    out x in) get the same per-element RMS as square ones (nanochat does the same).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            mom = group["momentum"]
            by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - mom)
                by_shape.setdefault(tuple(p.shape), []).append((p, g.lerp(buf, mom) if group["nesterov"] else buf))
            # matrices of one shape are orthogonalised together, as one batch: a depth-4 model's 16 square and 8
            # MLP matrices make 3 batched Newton-Schulz runs instead of 24
            for shape, items in by_shape.items():
                updates = orthogonalize(torch.stack([u for _, u in items]), group["ns_steps"])
                scale = math.sqrt(max(1.0, shape[-2] / shape[-1]))
                for (p, _), update in zip(items, updates, strict=True):
                    p.add_(update, alpha=-group["lr"] * scale)
        return None


class Optimizers:
    """Muon over `model.param_groups()["matrix"]` and AdamW over the embedding and unembedding, as one object.

    Every parameter group remembers its base learning rate (`base_lr`: the optim section's rate x the stage's
    multiplier); `set_lr(f)` sets each group to base_lr x f.
    """

    def __init__(self, model: torch.nn.Module, optim_cfg, lr_mult: float = 1.0):
        raw = model.module if hasattr(model, "module") else model  # unwrap DDP
        groups = raw.param_groups()
        width = raw.config.n_embd
        adam_scale = (width / ADAM_REFERENCE_WIDTH) ** -0.5
        self.params = [p for ps in groups.values() for p in ps]
        self.grad_clip = optim_cfg.grad_clip
        adam_groups = [
            dict(params=groups["embedding"], lr=optim_cfg.embedding_lr * adam_scale * lr_mult),
            dict(params=groups["unembedding"], lr=optim_cfg.unembedding_lr * adam_scale * lr_mult),
        ]
        # eps 1e-10 as nanochat: the embedding's rarely-seen rows have tiny second moments and a larger eps
        # would damp exactly those updates
        self.adamw = torch.optim.AdamW(
            adam_groups,
            betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2),
            eps=1e-10,
            weight_decay=optim_cfg.weight_decay,
        )
        self.muon = Muon(groups["matrix"], lr=optim_cfg.matrix_lr * lr_mult, momentum=optim_cfg.muon_momentum)
        self.optimizers = (self.adamw, self.muon)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["base_lr"] = g["lr"]

    def set_lr(self, factor: float) -> None:
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def clip(self) -> float:
        """Clip the global gradient norm to optim.grad_clip (0: no clipping); return the norm before clipping."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        if self.grad_clip > 0:
            return float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def step(self) -> float:
        """Clip, take one step of both optimizers, zero the gradients; return the gradient norm."""
        norm = self.clip()
        for opt in self.optimizers:
            opt.step()
        self.zero_grad()
        return norm

    # ---- state, flat, for safetensors ----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every optimizer state entry as `<optimizer>.<param index>.<key>` -> tensor (numbers become tensors)."""
        out = {}
        for name, opt in zip(("adamw", "muon"), self.optimizers, strict=False):
            index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
            for p, st in opt.state.items():
                for k, v in st.items():
                    t = v if torch.is_tensor(v) else torch.tensor(v, dtype=torch.float64)
                    out[f"{name}.{index[id(p)]}.{k}"] = t.detach().contiguous()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `state_tensors`; shapes must match the parameters (a mismatch raises ValueError)."""
        for name, opt in zip(("adamw", "muon"), self.optimizers, strict=False):
            params = [p for g in opt.param_groups for p in g["params"]]
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key, t in tensors.items():
                opt_name, idx, k = key.split(".", 2)
                if opt_name != name:
                    continue
                i = int(idx)
                if i >= len(params):
                    raise ValueError(f"optimizer state {key} names parameter {i}, the model has {len(params)}")
                if k != "step" and t.shape != params[i].shape:
                    raise ValueError(
                        f"optimizer state {key} has shape {tuple(t.shape)}, expected {tuple(params[i].shape)}"
                    )
                state.setdefault(i, {})[k] = t.clone()  # own the memory: never alias the caller's tensors
            sd = opt.state_dict()
            # AdamW keeps `step` as a float32 scalar tensor (not capturable): restore that type exactly
            sd["state"] = {
                i: {k: (t.to(torch.float32) if k == "step" else t) for k, t in st.items()} for i, st in state.items()
            }
            opt.load_state_dict(sd)
            for g in opt.param_groups:  # load_state_dict keeps our groups' hyperparameters; base_lr too
                g.setdefault("base_lr", g["lr"])


def lr_schedule(step: int, total: int, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    """The learning-rate factor at `step` (0-based) of `total`: linear warmup, constant, linear warmdown.

    Warmup rises to 1 over the first warmup_ratio·total steps; warmdown falls linearly from 1 to final_lr_frac
    over the last warmdown_ratio·total steps (nanochat's trapezoid).
    """
    warmup = round(warmup_ratio * total)
    warmdown = round(warmdown_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if step >= total - warmdown and warmdown > 0:
        progress = (total - step) / warmdown  # 1 at the start of the warmdown, 1/warmdown at the last step
        return progress + (1 - progress) * final_lr_frac
    return 1.0
