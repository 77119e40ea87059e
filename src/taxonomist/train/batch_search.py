"""Automatic batch-size search: the largest batch whose training step fits in the device's memory.

``find_batch_size(step, ...)`` calls ``step(b)`` (one forward + backward at batch size ``b``)
for growing ``b``:

1. **doubling** from ``start`` (``start``, ``2 start``, ``4 start``, ...) until a step runs out of
   memory or ``max_batch`` runs (if ``start`` itself fails, halving down instead);
2. **binary search** between the last size that ran and the first that failed, on multiples of
   ``multiple_of`` (8 by default: tensor-core friendly), at most ``max_trials`` steps in all;
3. **safety margin**: the result is ``margin`` (0.9) times the largest size that ran, rounded
   down to a multiple of ``multiple_of``. The probe measures one step on a fresh allocator; real
   training also fragments memory, runs validation, keeps a weight EMA and, on CUDA, varies
   cuDNN workspaces, so running right at the edge fails later, after minutes or hours. When
   ``max_batch`` itself runs, no limit was found and ``max_batch`` is used as is.

An out-of-memory error is ``torch.cuda.OutOfMemoryError`` / ``torch.OutOfMemoryError`` or a
``RuntimeError`` whose message says the device ran out of memory (CUDA, MPS: "MPS backend out of
memory", cuBLAS/cuDNN allocation failures, the CPU allocator); anything else is re-raised. After
each try the Python garbage is collected and the CUDA (or MPS) cache is emptied, so a failed try
does not shrink the next one.

**CPU**: no probe by default (``probe=None``). A CPU has no memory wall to find: a too-large batch
is not an error but swapping, which can freeze the machine before anything raises, and a CPU's
speed hardly depends on the batch size. ``find_batch_size`` then returns ``fallback`` (the
configured ``train.batch_size``), capped at ``max_batch``, and says so in the result's
``reason``. ``probe=True`` forces the search anywhere (the tests use it with a simulated limit).

Nothing is silent: the result is a :class:`BatchSizeResult` with the chosen size, a one-line
``reason`` and every trial (size, ok, seconds, peak memory on CUDA).

:class:`ProbeStep` builds ``step`` for a model: forward + backward on random inputs of the right
shape (images ``[B, 3, S, S]`` for a model that runs its backbone, features ``[B, D]`` for cached
features), in training mode, under the training autocast, with the real loss when given. It
reserves the memory the optimiser state will take (2 x the trainable parameters for AdamW) for
the duration of the search, zeroes the gradients after every step, and leaves no trace: the RNG
state, BatchNorm statistics (all buffers), gradients and train/eval mode are restored on exit::

    with ProbeStep(model, input_shape=(3, 128, 128), loss_fn=loss_fn, device="cuda") as step:
        result = find_batch_size(step, max_batch=256, device="cuda", fallback=256)
    print(result)    # 216 (largest batch that ran: 240, batch 256 ran out of memory on cuda; ...)

:func:`search_batch_size` does both in one call.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError

DEFAULT_MARGIN = 0.9
"""Fraction of the largest batch that ran which is used (module docstring)."""
OOM_MESSAGES = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
                "cudnn_status_not_enough_workspace", "can't allocate memory", "failed to allocate")

Log = Callable[[str], None]


def is_oom_error(exc: BaseException) -> bool:
    """Whether ``exc`` says a device (CUDA, MPS, CPU allocator) ran out of memory."""
    types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                  if isinstance(t, type))
    if types and isinstance(exc, types):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return any(s in msg for s in OOM_MESSAGES)
    return False


def free_memory(device: torch.device | str | None = None) -> None:
    """Collect Python garbage and empty the caching allocator of ``device`` (CUDA or MPS; no-op on CPU)."""
    gc.collect()
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if (dev is None or dev.type == "mps") and getattr(torch, "mps", None) is not None:
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            torch.mps.empty_cache()


@dataclass(frozen=True)
class Trial:
    """One try: the batch size, whether it ran, its wall time and (CUDA) the peak allocated bytes."""

    batch_size: int
    ok: bool
    seconds: float
    peak_bytes: int | None = None

    def __str__(self) -> str:
        peak = f", peak {self.peak_bytes / 2**30:.2f} GiB" if self.peak_bytes is not None else ""
        return f"batch {self.batch_size}: {'ok' if self.ok else 'out of memory'} ({self.seconds:.2f} s{peak})"


@dataclass(frozen=True)
class BatchSizeResult:
    """The chosen ``batch_size`` and why (``reason``), with the search's facts.

    ``limit``: the largest size that ran (None when nothing was probed); ``first_failure``: the
    smallest size that ran out of memory (None when none did); ``trials`` in the order run.
    """

    batch_size: int
    reason: str
    device: str
    probed: bool
    limit: int | None = None
    first_failure: int | None = None
    margin: float = DEFAULT_MARGIN
    trials: tuple[Trial, ...] = ()

    def __int__(self) -> int:
        return self.batch_size

    def __str__(self) -> str:
        return f"{self.batch_size} ({self.reason})"

    def to_json(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "reason": self.reason, "device": self.device, "probed": self.probed,
                "limit": self.limit, "first_failure": self.first_failure, "margin": self.margin,
                "trials": [{"batch_size": t.batch_size, "ok": t.ok, "seconds": round(t.seconds, 4),
                            "peak_bytes": t.peak_bytes} for t in self.trials]}


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")
    return value


def find_batch_size(step: Callable[[int], Any], *, start: int = 32, max_batch: int = 4096,
                    device: str | torch.device = "cuda", margin: float = DEFAULT_MARGIN, multiple_of: int = 8,
                    fallback: int | None = None, probe: bool | None = None, max_trials: int = 24,
                    log: Log | None = None) -> BatchSizeResult:
    """The largest batch size ``step`` runs at without running out of memory, times ``margin`` (module docstring).

    step: runs one training step at the given batch size (raising an out-of-memory error when it
        does not fit); :class:`ProbeStep` builds one for a model.
    start: first size tried; max_batch: largest size tried (and returned).
    device: where ``step`` runs: its cache is emptied between tries, and without ``probe`` a CPU
        device is not probed.
    margin: in (0, 1]; multiple_of: the sizes searched and the result are multiples of it (when
        at least that large).
    fallback: the size returned without probing (the configured batch size; default ``start``).
    probe: None: probe on CUDA and MPS only; True/False: force.
    max_trials: at most this many calls of ``step``.
    log: called with one line per trial.
    """
    dev = torch.device(device)
    start = _positive_int(start, "start")
    max_batch = _positive_int(max_batch, "max_batch")
    multiple_of = _positive_int(multiple_of, "multiple_of")
    max_trials = _positive_int(max_trials, "max_trials")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 < margin <= 1.0:
        raise ConfigError(f"margin={margin!r} must be in (0, 1]")
    start = min(start, max_batch)
    if probe is None:
        probe = dev.type in ("cuda", "mps")
    if not probe:
        size = min(_positive_int(fallback, "fallback") if fallback is not None else start, max_batch)
        what = "the configured batch size" if fallback is not None else "the start size"
        reason = (f"no memory probe on {dev.type}: a CPU has no memory limit to find (too large a batch swaps "
                  f"instead of failing) and its speed hardly depends on the batch size; using {what}, {size}"
                  + (f" (capped at max_batch={max_batch})" if fallback is not None and fallback > max_batch else ""))
        return BatchSizeResult(size, reason, str(dev), probed=False, margin=float(margin))

    trials: list[Trial] = []

    def attempt(b: int) -> bool:
        if dev.type == "cuda" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        ok = True
        try:
            step(b)
            if dev.type == "cuda" and torch.cuda.is_available():
                torch.cuda.synchronize(dev)
        except Exception as exc:  # noqa: BLE001 - anything but an out-of-memory error is re-raised
            if not is_oom_error(exc):
                raise
            ok = False
        # the exception (and the activations its traceback holds) is gone here: release the memory
        free_memory(dev)
        peak = (int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" and torch.cuda.is_available()
                else None)
        trials.append(Trial(b, ok, time.perf_counter() - t0, peak))
        if log is not None:
            log(f"  batch-size search: {trials[-1]}")
        return ok

    def snap(b: int) -> int:
        return b // multiple_of * multiple_of if b >= multiple_of else b

    good: int | None = None
    bad: int | None = None
    b = start
    if attempt(b):  # doubling
        good = b
        while good < max_batch and len(trials) < max_trials:
            b = min(good * 2, max_batch)
            if attempt(b):
                good = b
            else:
                bad = b
                break
    else:  # halving
        bad = b
        while b > 1 and len(trials) < max_trials:
            b //= 2
            if attempt(b):
                good = b
                break
            bad = b
    if good is None:
        raise ConfigError(
            f"one training step does not fit in the memory of {dev} even with a batch of {bad}: use mixed precision "
            "(train.amp=bf16), a smaller model.backbone.image_size, LoRA adapters (model.backbone.lora) or a frozen "
            "backbone (cached features), or a device with more memory")
    if bad is not None:  # binary search on multiples of multiple_of
        unit = multiple_of if good >= multiple_of else 1
        while bad - good > unit and len(trials) < max_trials:
            mid = (good + bad) // 2
            mid = mid // unit * unit
            if mid <= good:
                break
            if attempt(mid):
                good = mid
            else:
                bad = mid
    capped = len(trials) >= max_trials and (bad is None or bad - good > (multiple_of if good >= multiple_of else 1))
    note = f"; stopped after max_trials={max_trials} tries" if capped else ""
    if bad is None:
        size = good
        if good == max_batch:
            reason = (f"batch {max_batch} (max_batch) ran on {dev} without running out of memory; using it "
                      f"(no memory limit was reached, so no margin){note}")
        else:
            reason = f"largest batch that ran on {dev}: {good} (no failure seen){note}"
    else:
        size = min(max(1, snap(int(good * margin))), max_batch)
        rounding = f", rounded down to a multiple of {multiple_of}" if multiple_of > 1 and size >= multiple_of else ""
        reason = (f"largest batch that ran: {good}, batch {bad} ran out of memory on {dev}; using {margin:.0%} of "
                  f"{good}{rounding}: {size} (the margin leaves room for fragmentation, validation and other memory "
                  f"the probe does not see){note}")
    return BatchSizeResult(size, reason, str(dev), probed=True, limit=good, first_failure=bad, margin=float(margin),
                           trials=tuple(trials))


# ---------------------------------------------------------------- the probe step
def _surrogate_loss(outputs: Any) -> Tensor:
    tensors = ([outputs] if isinstance(outputs, Tensor) else
               list(outputs.values()) if isinstance(outputs, Mapping) else list(outputs))
    tensors = [t for t in tensors if isinstance(t, Tensor) and t.is_floating_point()]
    if not tensors:
        raise TypeError("the model's outputs hold no floating-point tensor to back-propagate from; give loss_fn")
    return sum((t.float().square().mean() for t in tensors), torch.zeros((), device=tensors[0].device))


class ProbeStep:
    """``step(batch_size)`` for :func:`find_batch_size`: forward + backward of ``model`` on random inputs.

    model: the model to train, not a DDP wrapper (each process probes its own device alone, then the
        processes agree on the smallest size; docs/scale.md); in training mode while the probe is open.
    input_shape: one sample's shape: ``(3, S, S)`` with ``input_key="images"`` (a model running its
        backbone) or ``(D,)`` with ``input_key="features"`` (cached features).
    loss_fn: taxonomist loss ``loss_fn(outputs, targets, extra_targets) -> {task: loss}``; random
        label-node targets are drawn from ``model.taxonomy`` (and random classes for ``attr/<name>``
        outputs). None: a surrogate loss (the mean square of every output).
    autocast: the training loop's autocast factory (``autocast_for``); None: full precision.
    optimizer_state_factor: reserve this many copies of the trainable parameters while probing,
        for the optimiser state allocated at the first real step (AdamW 2, SGD with momentum 1;
        add 1 per full weight copy kept beside, e.g. an EMA). ``reserve_bytes`` overrides it.
    model_kwargs: extra keyword arguments of every forward.

    Use it as a context manager (``with ProbeStep(...) as step``): on exit the gradients are
    cleared, the buffers (BatchNorm statistics) restored, the RNG state restored (the probe's random
    inputs and dropout masks do not shift the training run's random stream), the train/eval mode
    restored and the reserve freed.
    """

    def __init__(self, model: nn.Module, *, input_shape: Sequence[int], input_key: str = "images",
                 loss_fn: Callable[..., Mapping[str, Tensor]] | None = None, device: str | torch.device | None = None,
                 autocast: Callable[[], AbstractContextManager[Any]] | None = None,
                 optimizer_state_factor: float = 2.0, reserve_bytes: int | None = None,
                 model_kwargs: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        self.model = model
        self.input_shape = tuple(int(s) for s in input_shape)
        self.input_key = input_key
        self.loss_fn = loss_fn
        first = next(iter(model.parameters()), None)
        self.device = torch.device(device) if device is not None else (first.device if first is not None
                                                                        else torch.device("cpu"))
        self.autocast = autocast or contextlib.nullcontext
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        self.reserve_bytes = int(reserve_bytes if reserve_bytes is not None else optimizer_state_factor * trainable)
        self.model_kwargs = dict(model_kwargs or {})
        self.seed = seed
        self._stack: contextlib.ExitStack | None = None
        self._reserve: Tensor | None = None
        self.calls = 0

    # -------------------------------------------------------- context
    def __enter__(self) -> ProbeStep:
        stack = contextlib.ExitStack()
        accel = self.device.type in ("cuda", "mps")
        if accel:  # the device's generator too (CUDA: the probe's device only)
            index = self.device.index if self.device.index is not None else 0
            stack.enter_context(torch.random.fork_rng(devices=[index], device_type=self.device.type))
        else:
            stack.enter_context(torch.random.fork_rng(devices=[]))
        torch.manual_seed(self.seed)
        was_training = self.model.training
        saved = {n: b.detach().to("cpu", copy=True) for n, b in self.model.named_buffers()}
        stack.callback(self._restore, was_training, saved)
        self.model.train()
        if self.reserve_bytes > 0:
            self._reserve = torch.empty(self.reserve_bytes, dtype=torch.uint8, device=self.device)
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def _restore(self, was_training: bool, saved: dict[str, Tensor]) -> None:
        self._reserve = None
        self.model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                if n in saved:
                    b.copy_(saved[n])
        self.model.train(was_training)
        free_memory(self.device)

    # -------------------------------------------------------- one step
    def _targets(self, b: int) -> Tensor:
        tax = getattr(self.model, "taxonomy", None)
        if tax is None:
            return torch.zeros(b, dtype=torch.long, device=self.device)
        labels = torch.as_tensor(tax.label_ids, dtype=torch.long)
        return labels[torch.randint(len(labels), (b,))].to(self.device)

    def __call__(self, batch_size: int) -> None:
        b = _positive_int(batch_size, "batch_size")
        self.calls += 1
        x = torch.randn((b, *self.input_shape), device=self.device)
        kwargs = dict(self.model_kwargs)
        targets = self._targets(b) if self.loss_fn is not None else None
        head = getattr(self.model, "head", None)
        if targets is not None and getattr(head, "uses_targets", False):
            kwargs["targets"] = targets
        try:
            with self.autocast():
                outputs = self.model(**{self.input_key: x}, **kwargs)
                if self.loss_fn is None:
                    loss = _surrogate_loss(outputs)
                else:
                    extra = {k: torch.randint(v.shape[-1], (b,), device=self.device)
                             for k, v in outputs.items() if k.startswith("attr/")} or None
                    losses = self.loss_fn(outputs, targets, extra)
                    loss = sum(losses.values(), torch.zeros((), device=self.device))
            loss.backward()
        finally:
            self.model.zero_grad(set_to_none=True)


def search_batch_size(model: nn.Module, *, input_shape: Sequence[int], input_key: str = "images",
                      loss_fn: Callable[..., Mapping[str, Tensor]] | None = None,
                      device: str | torch.device = "cuda",
                      autocast: Callable[[], AbstractContextManager[Any]] | None = None,
                      optimizer_state_factor: float = 2.0, model_kwargs: Mapping[str, Any] | None = None,
                      **search: Any) -> BatchSizeResult:
    """:class:`ProbeStep` + :func:`find_batch_size` (``search``: its keyword arguments: start, max_batch,
    margin, multiple_of, fallback, probe, max_trials, log). Without a probe (CPU) the model is not run."""
    dev = torch.device(device)
    probe = search.get("probe")
    if probe is False or (probe is None and dev.type not in ("cuda", "mps")):
        return find_batch_size(lambda b: None, device=dev, **search)
    with ProbeStep(model, input_shape=input_shape, input_key=input_key, loss_fn=loss_fn, device=dev,
                   autocast=autocast, optimizer_state_factor=optimizer_state_factor,
                   model_kwargs=model_kwargs) as step:
        return find_batch_size(step, device=dev, **search)


__all__ = ["BatchSizeResult", "Trial", "ProbeStep", "find_batch_size", "search_batch_size", "is_oom_error",
           "free_memory", "DEFAULT_MARGIN"]
