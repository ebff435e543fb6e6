"""A hook before each update mini-batch in verl's engines: the mini-batch pass of losses that need it.

Reason: verl 0.9.1's ``BaseEngine.train_batch`` (every engine: FSDP, Megatron, ...) zeroes the gradients and runs
``forward_backward_batch``, which forwards and back-propagates the mini-batch's micro-batches one by one with the
installed loss. Nothing runs before the first micro-batch, so a loss whose statistics span the whole mini-batch at
the current policy (BAPO's clip bounds, STAPO's kept-token count: the ``MINIBATCH_STATS`` need) cannot get them,
and its result would depend on the micro-batch split. The shim wraps ``BaseEngine.train_batch``: when the loss
function has ``before_mini_batch(engine, data)`` (:class:`hapo_verl.integration.loss.RegisteredLoss`), it is called
first with the mini-batch exactly as the engine received it, and ``after_mini_batch()`` after the update. Any other
loss function runs verl's method unchanged.

Applied in each actor worker process when a loss that needs it arrives there (``RegisteredLoss.__setstate__``), and
with the other shims by :func:`hapo_verl.patches.apply_all`.

Targets: verl 0.9.1.
Expiry: ``tests/test_patches_on_cpu.py::test_minibatch_prepass_still_needed`` fails once verl's
``BaseEngine.train_batch`` does anything with its loss function besides handing it to ``forward_backward_batch``
(a hook of its own).
"""

from __future__ import annotations

import functools

NAME = "minibatch_prepass"
REASON = ("verl 0.9.1's engines run an update mini-batch micro-batch by micro-batch with no hook before the first, so "
          "a loss cannot see the whole mini-batch at the current policy")
TARGETS = {"verl": "0.9.1"}

#: verl's unpatched ``BaseEngine.train_batch`` (set on first apply)
ORIGINAL = None


def is_applied() -> bool:
    from verl.workers.engine.base import BaseEngine

    return getattr(BaseEngine.train_batch, "_hapo_verl_minibatch_hook", False)


def apply() -> None:
    global ORIGINAL
    from verl.workers.engine.base import BaseEngine

    if is_applied():
        return
    original = BaseEngine.train_batch

    @functools.wraps(original)
    def train_batch(self, data, loss_function):
        before = getattr(loss_function, "before_mini_batch", None)
        if before is None:
            return original(self, data, loss_function)
        before(self, data)
        try:
            return original(self, data, loss_function)
        finally:
            loss_function.after_mini_batch()

    train_batch._hapo_verl_minibatch_hook = True
    ORIGINAL = original
    BaseEngine.train_batch = train_batch
