"""A model's tensors swapped module by module during a forward, never all at once.

The two SPSA evaluations need ``L(theta + eps z)`` and ``L(theta - eps z)``. Writing
``theta + eps z`` into the weights and undoing it afterwards either keeps a copy of every
trainable tensor (exact: twice the weights' memory) or relies on arithmetic
(``+eps z, -2 eps z, +eps z``), which does not come back to ``theta`` in 16-bit: every step
leaves rounding drift behind. :class:`LayerwiseSubstitution` does neither. A forward pre-hook on
each module that owns trainable tensors puts a substitute in their place just before the
module runs (here ``theta_n + eps z_n``, made from the step's seed), and a forward hook puts the
original tensor back just after. ``theta`` is never written, so it is bit-identical after the
evaluations in every dtype, and the extra memory is one module's substitutes at a time (one
layer's tensors, not the model's).

The same mechanism gives the full-parameter reference policy without a second model in memory
(:mod:`zopro_lightning.policy.reference`): the substitutes are the initial weights, read from a
memory-mapped file.

What it relies on: each tensor is read by the forward of a module that holds it (true of
``nn.Linear``, embeddings, norms, and of peft's LoRA layers). A tensor read elsewhere (a
``ParameterDict`` indexed by its parent's forward) is not swapped: :meth:`check_covered` names
it, and ``SPSASettings(layerwise=False)`` perturbs in place with a copy instead. A tensor shared
by two modules (tied input and output embeddings) is swapped in each, with the same substitute.
Under FSDP2 (``fully_shard``) the hooks run inside the sharded block's forward, after its
parameters were gathered: the substitute is made from the whole, unsharded tensor.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from torch import Tensor, nn

#: ``make(name, current) -> substitute``: ``current`` is the tensor the module holds now
#: (the whole tensor, also under FSDP), the substitute has its shape
MakeFn = Callable[[str, Tensor], Tensor]


class LayerwiseSubstitution:
    """Swaps ``params`` (trainable tensors of ``model``, by name) for substitutes, module by
    module, inside :meth:`substituted`.

    Args:
        model: the network whose forward the loss runs.
        params: the tensors to swap, by name (the names given to ``make``).
    """

    def __init__(self, model: nn.Module, params: Mapping[str, Tensor]) -> None:
        names = {id(param): name for name, param in params.items()}
        self.slots: dict[nn.Module, list[tuple[str, str]]] = defaultdict(list)
        for module in model.modules():
            for attr, param in module._parameters.items():
                if param is not None and id(param) in names:
                    self.slots[module].append((attr, names[id(param)]))
        self.names = frozenset(params)

    @contextmanager
    def substituted(self, make: MakeFn) -> Iterator[set[str]]:
        """Inside, each module's forward sees ``make(name, current)`` in place of its tensor
        ``name``; the original is back as soon as the module's forward returns (or raises).

        Yields:
            the names swapped so far (for :meth:`check_covered` after the forward).
        """
        touched: set[str] = set()
        saved: dict[nn.Module, list[list[tuple[str, Tensor]]]] = defaultdict(list)

        def swap_in(module: nn.Module, args: object) -> None:
            originals = []
            for attr, name in self.slots[module]:
                current = module._parameters[attr]
                originals.append((attr, current))
                module._parameters[attr] = nn.Parameter(make(name, current), requires_grad=False)
                touched.add(name)
            saved[module].append(originals)

        def swap_back(module: nn.Module, args: object, output: object) -> None:
            if saved[module]:
                for attr, original in saved[module].pop():
                    module._parameters[attr] = original

        handles = []
        try:
            for module in self.slots:
                handles.append(module.register_forward_pre_hook(swap_in))
                handles.append(module.register_forward_hook(swap_back, always_call=True))
            yield touched
        finally:
            for handle in handles:
                handle.remove()
            for module, stack in saved.items():  # a forward that raised before its hook ran
                while stack:
                    for attr, original in stack.pop():
                        module._parameters[attr] = original

    def check_covered(self, touched: set[str]) -> None:
        """Raise unless every tensor was swapped in the forward that just ran.

        Raises:
            ValueError: naming the tensors the forward read outside their modules' forward.
        """
        missing = sorted(self.names - touched)
        if missing:
            raise ValueError(
                f"layerwise perturbation: {len(missing)} trainable tensor(s) were not read "
                f"through their module's forward (e.g. {missing[:3]}), so the loss would not "
                "see their perturbation. Fix: set spsa.layerwise=false (perturb in place with "
                "a copy of the trainable tensors), or leave these tensors frozen."
            )
