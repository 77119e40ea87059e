"""GradNorm task weighting (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018, section 3).

With task weights ``w_i`` and losses ``L_i``, at the last shared layer ``W``:

    G_i(t)   = || grad_W  w_i(t) L_i(t) ||_2            (= w_i * ||grad_W L_i||)
    G_bar(t) = mean_i G_i(t)
    Ltilde_i = L_i(t) / L_i(0),   r_i(t) = Ltilde_i / mean_j Ltilde_j     (relative inverse training rate)
    L_grad   = sum_i | G_i(t) - G_bar(t) * r_i(t)^alpha |                  (eq. 2; the target is a constant)

``L_grad`` is differentiated with respect to the weights only and the weights take one step of
their own optimiser (Adam by default), then are renormalised so that ``sum_i w_i = T`` (the number
of tasks). Since ``dL_grad/dw_i = sign(G_i - target_i) * ||grad_W L_i||``, a task whose weighted
gradient is **too large** gets its weight **reduced** (FIELD_NOTES.md: Linnaeus multiplied a weight
by its gradient norm over the target, the opposite direction, so the largest-gradient task took
all the weight).

Practicalities:

* **Measurement inside the step**: ``torch.autograd.grad(L_i, W, retain_graph=True)`` per task on
  the live graph, before the training backward. No extra backward pass over the whole model
  (only the part between ``L_i`` and ``W``), ``.grad`` is untouched, and DDP's reducer is not
  triggered (it hooks gradient accumulation). Under DDP the losses and the per-task gradients at
  ``W`` are averaged over the ranks where each task is present (``all_reduce``; ``update`` must then
  run on every rank at every step, as the training loop does) before norms are taken, so every rank
  computes the same weights, those of the whole batch.
* **Absent tasks** (no target in the batch: the loss is a connected zero; any loss that is not
  positive and finite counts as absent, since ``L_i(t) / L_i(0)`` needs positive losses) and tasks
  whose gradient at ``W`` is zero are skipped in that update; their weights stay; the weights of the
  tasks that took part are rescaled to keep their previous sum (so ``sum w = T`` still holds).
  ``L_i(0)`` is a task's loss at the first step it is present.
* ``warmup_steps``: no update before that step (``L_i(0)`` is still recorded). ``update_every``:
  update on micro-steps ``step % update_every == 0``; it must be a multiple of (so at least)
  ``accumulation_steps`` so the weights change at most once per optimiser step and all micro-batches
  of one optimiser step use the same weights.
* Weights, ``L_i(0)``, the optimiser moments and the step counters are buffers: they are in
  ``state_dict()`` and move with ``.to(device)``.
* **Heads that refine their task logits** (``refined``, ``conditional``: level ``j+1``'s logits are
  ``Z_{j+1} + log(P_j . H + eps)`` with ``P_j`` from level ``j``): the gradient of level ``j+1``'s
  refined loss at ``W`` also flows through every level above it, so the ``G_i`` are not the
  per-task gradients the method balances, and a child level's gradient is carried by (and
  shrinks with) its parents' confidence. With ``measure="unrefined"`` (the default) the training
  loop evaluates the same loss on the head's plain per-level logits ``Z_j`` (``head.refine =
  False``, same embedding, no second pass through the model) and passes those losses as
  ``grad_losses``: the ``G_i`` are measured on them, one linear classifier per task (the design
  documents' setting). The rates ``r_i`` and ``L_i(0)`` stay those of the training losses, the
  ones the weights multiply: a plain level classifier need not learn as fast as the refined one it
  feeds (the prior does part of its work), so its loss would misreport the task's training rate.
  ``measure="outputs"`` measures on the training losses. Heads without plain logits ignore it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .weighting import TaskWeighting, check_loss_keys, check_tasks, register_weighting


@register_weighting("gradnorm")
class GradNorm(TaskWeighting):
    """GradNorm (module docstring).

    Options: ``tasks`` (required: ``loss.tasks``), ``alpha`` (restoring-force strength, 1.5 as in the
    paper's NYUv2 runs; 0 equalises the gradient norms), ``lr`` (of the weights' optimiser, 0.025),
    ``optimizer`` (``adam`` / ``sgd``), ``warmup_steps`` (0), ``update_every`` (micro-steps
    between updates, 1), ``accumulation_steps`` (gradient accumulation of the run, 1),
    ``min_weight`` (floor before renormalising, 1e-3), ``initial_weights`` (``{task: w}``, default
    1 each; renormalised to sum to T), ``measure`` (``unrefined``: on heads with plain per-level
    logits the gradient norms are measured on the losses of those, see the module docstring;
    ``outputs``: on the training losses).
    """

    needs_shared_parameters = True
    MEASURES = ("unrefined", "outputs")

    def __init__(self, tasks: Sequence[str] | None = None, alpha: float = 1.5, lr: float = 0.025,
                 optimizer: str = "adam", warmup_steps: int = 0, update_every: int = 1,
                 accumulation_steps: int = 1, min_weight: float = 1e-3,
                 initial_weights: dict[str, float] | None = None, measure: str = "unrefined") -> None:
        super().__init__()
        self.tasks = check_tasks(tasks, "gradnorm weighting")
        if measure not in self.MEASURES:
            raise ConfigError(f"gradnorm measure={measure!r} must be one of {', '.join(self.MEASURES)} "
                              "(unrefined: gradient norms of refined heads on their plain per-level logits)")
        self.measure = measure
        if not float(alpha) >= 0.0:
            raise ConfigError(f"gradnorm alpha={alpha} must be >= 0")
        if not float(lr) > 0.0:
            raise ConfigError(f"gradnorm lr={lr} must be > 0")
        if optimizer not in ("adam", "sgd"):
            raise ConfigError(f"gradnorm optimizer={optimizer!r} must be 'adam' or 'sgd'")
        if int(warmup_steps) < 0:
            raise ConfigError(f"gradnorm warmup_steps={warmup_steps} must be >= 0")
        if int(accumulation_steps) < 1 or int(update_every) < 1:
            raise ConfigError(f"gradnorm update_every={update_every} and accumulation_steps={accumulation_steps} "
                              "must be >= 1")
        if int(update_every) % int(accumulation_steps):
            k = int(accumulation_steps)
            raise ConfigError(
                f"gradnorm update_every={update_every} must be a multiple of the gradient-accumulation steps "
                f"({k}): the task weights may change at most once per optimiser step, between two of them "
                f"(use update_every={max(k, int(update_every) // k * k)} or {(int(update_every) // k + 1) * k})")
        if not 0.0 < float(min_weight) < 1.0:
            raise ConfigError(f"gradnorm min_weight={min_weight} must be in (0, 1)")
        self.alpha, self.lr, self.optimizer = float(alpha), float(lr), optimizer
        self.warmup_steps, self.update_every = int(warmup_steps), int(update_every)
        self.accumulation_steps, self.min_weight = int(accumulation_steps), float(min_weight)
        n = len(self.tasks)
        w = torch.ones(n, dtype=torch.float64)
        if initial_weights:
            unknown = sorted(set(initial_weights) - set(self.tasks))
            if unknown:
                raise ConfigError(f"gradnorm initial_weights names unknown task(s) {unknown}; "
                                  f"tasks: {list(self.tasks)}")
            w = torch.tensor([float(initial_weights.get(t, 1.0)) for t in self.tasks], dtype=torch.float64)
            if not bool((w > 0).all()):
                raise ConfigError(f"gradnorm initial_weights must be > 0, got {initial_weights}")
            w = w * n / w.sum()
        self.register_buffer("w", w)
        self.register_buffer("initial_losses", torch.full((n,), float("nan"), dtype=torch.float64))
        self.register_buffer("adam_m", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("adam_v", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_grad_norms", torch.full((n,), float("nan"), dtype=torch.float64))
        self.register_buffer("last_rates", torch.full((n,), float("nan"), dtype=torch.float64))

    def weights(self, losses: dict[str, Tensor] | Iterable[str]) -> dict[str, Tensor]:
        names = list(losses)
        idx = {t: i for i, t in enumerate(self.tasks)}
        unknown = [t for t in names if t not in idx]
        if unknown:
            raise ConfigError(f"gradnorm weighting was built for tasks {list(self.tasks)}, not {unknown}")
        return {t: self.w[idx[t]].float() for t in names}

    def forward(self, losses: dict[str, Tensor]) -> Tensor:
        check_loss_keys(self.tasks, losses, "gradnorm weighting")
        return super().forward(losses)

    def current_weights(self) -> dict[str, float]:
        return {t: float(v) for t, v in zip(self.tasks, self.w.tolist(), strict=True)}

    def diagnostics(self) -> dict[str, float]:
        """Last measured gradient norms ``||grad_W L_i||`` and rates ``r_i`` (NaN where skipped)."""
        out = {f"grad_norm/{t}": float(g) for t, g in zip(self.tasks, self.last_grad_norms.tolist(), strict=True)}
        out.update({f"rate/{t}": float(r) for t, r in zip(self.tasks, self.last_rates.tolist(), strict=True)})
        return out

    def is_update_step(self, step: int) -> bool:
        return step >= self.warmup_steps and step % self.update_every == 0

    def update(self, losses: dict[str, Tensor], shared_parameters: Iterable[nn.Parameter] | None = None,
               step: int = 0, grad_losses: dict[str, Tensor] | None = None) -> None:
        """One GradNorm step (module docstring). ``losses``: the training losses (presence, ``L_i(0)``
        and the rates); ``grad_losses``: the losses whose gradients at ``shared_parameters`` give the
        ``G_i`` (the same tasks; default ``losses``), e.g. a refined head's plain-logit losses."""
        check_loss_keys(self.tasks, losses, "gradnorm weighting")
        if grad_losses is None:
            grad_losses = losses
        else:
            check_loss_keys(self.tasks, grad_losses, "gradnorm weighting (grad_losses)")
        values = torch.stack([losses[t].detach().double().reshape(()) for t in self.tasks]).to(self.w.device)
        present = torch.isfinite(values) & (values > 0)
        present &= torch.tensor([losses[t].requires_grad for t in self.tasks], device=self.w.device)
        local = present & torch.tensor([grad_losses[t].requires_grad for t in self.tasks], device=self.w.device)
        # under DDP: mean over the ranks where the task is present, so every rank sees the same numbers
        count = _all_reduce_sum(present.double())
        values = _all_reduce_sum(torch.where(present, values, torch.zeros_like(values))) / count.clamp(min=1)
        present = count > 0
        first = present & torch.isnan(self.initial_losses)
        self.initial_losses.copy_(torch.where(first, values, self.initial_losses))
        if not self.is_update_step(int(step)):
            return
        params = [p for p in (shared_parameters or []) if p.requires_grad]
        if not params:
            raise ConfigError("gradnorm needs the parameters of the last shared layer (model.last_shared_parameters()) "
                              "and at least one of them must require a gradient")
        norms = self._grad_norms(grad_losses, params, local, count)
        used = present & (norms > 0) & torch.isfinite(norms) & (self.initial_losses > 0)
        self.last_grad_norms.copy_(torch.where(used, norms, torch.full_like(norms, float("nan"))))
        if int(used.sum()) < 2:             # GradNorm balances tasks against each other: needs two
            self.last_rates.fill_(float("nan"))
            return
        ratio = values / self.initial_losses
        rate = ratio / ratio[used].mean()
        self.last_rates.copy_(torch.where(used, rate, torch.full_like(rate, float("nan"))))
        w = self.w.clone().requires_grad_(True)
        g_w = w * norms                                                   # G_i = w_i ||grad_W L_i||
        target = (g_w[used].mean() * rate.clamp(min=0).pow(self.alpha)).detach()
        l_grad = (g_w - target).abs()[used].sum()
        (grad,) = torch.autograd.grad(l_grad, w)
        self._step(grad.detach(), used)
        self.n_updates += 1

    def _grad_norms(self, losses: dict[str, Tensor], params: list[nn.Parameter], local: Tensor,
                    count: Tensor) -> Tensor:
        """``||grad_W L_i||`` per task. Under DDP the per-task gradients at ``W`` are averaged over the
        ranks where the task is present *before* the norm is taken (one all-reduce of T x |W| numbers),
        so the norm is that of the batch gradient, as in a single process, not a mean of noisier
        per-rank norms."""
        world = _world_size()
        dev = self.w.device
        if world == 1:
            norms = torch.zeros(len(self.tasks), dtype=torch.float64, device=dev)
            for i, t in enumerate(self.tasks):
                if bool(local[i]):
                    grads = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
                    sq = sum((g.double().pow(2).sum() for g in grads if g is not None),
                             start=torch.zeros((), dtype=torch.float64, device=dev))
                    norms[i] = sq.sqrt().to(dev)
            return norms
        size = sum(p.numel() for p in params)
        flat = torch.zeros(len(self.tasks), size, dtype=torch.float32, device=params[0].device)
        for i, t in enumerate(self.tasks):
            if bool(local[i]):
                grads = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
                flat[i] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                                     for g, p in zip(grads, params)])
        flat = _all_reduce_sum(flat) / count.clamp(min=1).to(flat)[:, None]
        return flat.double().norm(dim=1).to(dev)

    @torch.no_grad()
    def _step(self, grad: Tensor, used: Tensor) -> None:
        before = self.w[used].sum()
        if self.optimizer == "adam":
            b1, b2, eps = 0.9, 0.999, 1e-8
            self.adam_m.copy_(torch.where(used, b1 * self.adam_m + (1 - b1) * grad, self.adam_m))
            self.adam_v.copy_(torch.where(used, b2 * self.adam_v + (1 - b2) * grad * grad, self.adam_v))
            k = float(self.n_updates) + 1
            step = self.lr * (self.adam_m / (1 - b1 ** k)) / ((self.adam_v / (1 - b2 ** k)).sqrt() + eps)
        else:
            step = self.lr * grad
        new = torch.where(used, (self.w - step).clamp(min=self.min_weight), self.w)
        new = torch.where(used, new * before / new[used].sum(), new)           # keep the used tasks' sum
        self.w.copy_(new * len(self.tasks) / new.sum())                       # sum w = T


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over DDP ranks when a process group is running (identity otherwise)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        y = x.clone()
        dist.all_reduce(y)
        return y
    return x
