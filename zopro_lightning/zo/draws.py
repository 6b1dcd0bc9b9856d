"""Seeded random draws for the SPSA directions, fast on many CPU cores and on GPUs.

A direction ``z`` is drawn again each time it is needed (perturb, un-perturb, update), so the
draw is the step's main cost beyond the two forwards. On a GPU one generator fills any tensor
in parallel. On a CPU a ``torch.Generator`` is one serial Mersenne-Twister stream, a few
nanoseconds per number: for full-parameter training its three draws of every weight cost more
than a forward of a small batch. So on a CPU a tensor is cut into fixed chunks of
:data:`CHUNK_NUMEL` elements: chunk ``0`` is drawn from the tensor's own generator, chunk
``c > 0`` from a generator seeded with ``derive_seed(seed of chunk 0, c)``, and the chunks are
drawn on a pool of threads (``torch.get_num_threads()``). The chunks are fixed by the tensor's
size alone, so ``z`` is the same whatever the number of threads; a tensor of at most
:data:`CHUNK_NUMEL` elements is exactly the draw of its generator, as a plain
``torch.randn(shape, generator=g)`` would give.

:func:`add_draw_tasks` cuts ``param += alpha * z`` into such chunks, each drawn into a small
per-thread buffer and added at once, so ``z`` is never held whole: the step's memory stays that
of inference. The SPSA step hands the tasks of all tensors to :func:`run_tasks` together, which
deals them out to the threads, so small tensors are drawn side by side too.

A *fill* is the per-sampler rule ``fill(out, generator)`` that writes standard draws into the
flat float32 tensor ``out`` (for example ``out.normal_(generator=generator)``).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

Fill = Callable[[Tensor, torch.Generator], object]
Task = Callable[[], object]

# elements per generator on a CPU (128 KiB of float32): no more than torch's intra-op grain
# size (32768), so a chunk's add runs on its own thread and opens no nested OpenMP team
CHUNK_NUMEL = 1 << 15

_pools: dict[int, ThreadPoolExecutor] = {}
_buffers = threading.local()
os.register_at_fork(after_in_child=_pools.clear)  # a forked child has none of the threads


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed derived deterministically from ``parts`` (stable across processes and
    platforms, unlike ``hash``)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _chunk_generator(generator: torch.Generator, index: int) -> torch.Generator:
    if index == 0:
        return generator
    chunk = torch.Generator(device=generator.device)
    chunk.manual_seed(derive_seed(generator.initial_seed(), "chunk", index))
    return chunk


def _chunks(tensor: Tensor) -> list[tuple[int, int, int]]:
    """``(index, start, stop)`` of the chunks of ``tensor`` (one chunk off a CPU)."""
    numel = tensor.numel()
    if tensor.device.type != "cpu" or numel <= CHUNK_NUMEL:
        return [(0, 0, numel)]
    return [
        (index, start, min(start + CHUNK_NUMEL, numel))
        for index, start in enumerate(range(0, numel, CHUNK_NUMEL))
    ]


def run_tasks(tasks: list[Task], parallel: bool = True) -> None:
    """Run ``tasks`` (which touch disjoint memory), autograd off, on a pool of
    ``torch.get_num_threads()`` threads; serially when ``parallel`` is false (any CUDA tensor:
    its kernels belong on the caller's stream), with one thread or one task, or when called
    from one of the pool's own threads (a task that draws a whole tensor: handing its chunks
    to the pool it runs on and waiting for them would let every pool thread wait on work no
    thread is free to run)."""
    threads = max(1, torch.get_num_threads())
    nested = getattr(_buffers, "in_pool", False)
    if not parallel or threads == 1 or len(tasks) <= 1 or nested:
        with torch.no_grad():
            for task in tasks:
                task()
        return
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="zopro-draw")

    inference = torch.is_inference_mode_enabled()  # writes to inference tensors need it

    def run_share(share: list[Task]) -> None:
        _buffers.in_pool = True  # a task that runs tasks runs them here, on this thread
        # grad and inference mode are per thread: a worker starts with grad on
        with torch.inference_mode(inference), torch.no_grad():
            for task in share:
                task()

    # one share of the tasks a thread (every threads-th task), not one hand-off a task
    shares = [tasks[i::threads] for i in range(min(threads, len(tasks)))]
    for future in [_pools[threads].submit(run_share, share) for share in shares]:
        future.result()  # re-raises a worker's error here


def draw(param: Tensor, generator: torch.Generator, fill: Fill) -> Tensor:
    """Standard draws shaped like ``param``, in float32 on its device (float32 keeps the
    directions of low-precision models identical to full-precision ones).

    Args:
        param: ``[*shape]``, gives shape and device.
        generator: the tensor's seeded generator (that of chunk 0 on a CPU).
        fill: writes standard draws into a flat float32 tensor.
    Returns:
        ``[*shape]`` float32.
    """
    out = torch.empty(param.numel(), device=param.device, dtype=torch.float32)

    def fill_chunk(index: int, start: int, stop: int) -> Task:
        return lambda: fill(out[start:stop], _chunk_generator(generator, index))

    run_tasks([fill_chunk(*chunk) for chunk in _chunks(out)], parallel=out.device.type == "cpu")
    return out.view(param.shape)


def _chunk_buffer(numel: int) -> Tensor:
    """This thread's float32 scratch of :data:`CHUNK_NUMEL` values, its first ``numel``."""
    buffer = getattr(_buffers, "chunk", None)
    if buffer is None:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference
            buffer = _buffers.chunk = torch.empty(CHUNK_NUMEL, dtype=torch.float32)
    return buffer[:numel]


def _chunked(param: Tensor) -> bool:
    """Whether ``param`` is worked on chunk by chunk: a contiguous CPU tensor."""
    return param.device.type == "cpu" and param.is_contiguous()


def add_draw_tasks(
    param: Tensor, generator: torch.Generator, fill: Fill, alpha: float
) -> list[Task]:
    """Tasks that together do ``param += alpha * z`` in place, with
    ``z = draw(param, generator, fill).to(param.dtype)`` (the same numbers), for
    :func:`run_tasks`.

    A contiguous CPU tensor of any dtype is done chunk by chunk, each chunk drawn into a small
    per-thread float32 buffer and added at once, so ``z`` is never held whole; any other
    tensor in one task that draws ``z`` whole.
    """
    if not _chunked(param):
        return [lambda: param.add_(draw(param, generator, fill).to(param.dtype), alpha=alpha)]
    flat = param.detach().view(-1)

    def add_chunk(index: int, start: int, stop: int) -> Task:
        def task() -> None:
            part = _chunk_buffer(stop - start)
            fill(part, _chunk_generator(generator, index))
            z = part if flat.dtype == part.dtype else part.to(flat.dtype)
            flat[start:stop].add_(z, alpha=alpha)

        return task

    return [add_chunk(*chunk) for chunk in _chunks(flat)]


def perturbed_copy_tasks(
    param: Tensor, out: Tensor, generator: torch.Generator, fill: Fill, alpha: float
) -> list[Task]:
    """Tasks that together write ``out = param + alpha * z`` (``z`` as in
    :func:`add_draw_tasks`, the same arithmetic, so ``out`` equals ``param`` after
    ``add_draw_tasks`` bit for bit) without changing ``param``; chunk by chunk on a CPU."""
    if not _chunked(param):
        return [
            lambda: torch.add(
                param, draw(param, generator, fill).to(param.dtype), alpha=alpha, out=out
            )
        ]
    flat, flat_out = param.detach().view(-1), out.view(-1)

    def copy_chunk(index: int, start: int, stop: int) -> Task:
        def task() -> None:
            part = _chunk_buffer(stop - start)
            fill(part, _chunk_generator(generator, index))
            z = part if flat.dtype == part.dtype else part.to(flat.dtype)
            torch.add(flat[start:stop], z, alpha=alpha, out=flat_out[start:stop])

        return task

    return [copy_chunk(*chunk) for chunk in _chunks(flat)]


def rounded_update_tasks(
    param: Tensor,
    generators: list[torch.Generator],
    fill: Fill,
    alphas: list[float],
    decay: float,
    rounding: torch.Generator,
    round_fn: Callable[[Tensor, torch.dtype, torch.Generator], Tensor],
) -> list[Task]:
    """Tasks that together do ``param = round_fn(decay * param + sum_j alphas[j] z_j)`` with the
    sum taken in float32 (``z_j`` drawn from ``generators[j]``, float32 as :func:`draw` gives)
    and one rounding to ``param.dtype`` at the end; chunk by chunk on a CPU, where chunk ``c``
    of the rounding takes the generator ``derive(rounding, c)``."""
    def update(target: Tensor, zs: Callable[[int], Tensor], round_with: torch.Generator) -> None:
        total = target.to(torch.float32, copy=True).mul_(decay)  # (chunk,)
        for j, alpha in enumerate(alphas):
            total.add_(zs(j), alpha=alpha)
        target.copy_(round_fn(total, param.dtype, round_with))

    if not _chunked(param):
        return [lambda: update(param, lambda j: draw(param, generators[j], fill), rounding)]
    flat = param.detach().view(-1)

    def update_chunk(index: int, start: int, stop: int) -> Task:
        def chunk_z(j: int) -> Tensor:
            part = _chunk_buffer(stop - start)
            fill(part, _chunk_generator(generators[j], index))
            return part

        return lambda: update(flat[start:stop], chunk_z, _chunk_generator(rounding, index))

    return [update_chunk(*chunk) for chunk in _chunks(flat)]


def normal_fill(out: Tensor, generator: torch.Generator) -> None:
    """``out ~ N(0, I)``."""
    out.normal_(generator=generator)


def rademacher_fill(out: Tensor, generator: torch.Generator) -> None:
    """``out`` uniform on ``{-1, +1}`` (the numbers of ``torch.randint(0, 2, ...) * 2 - 1``)."""
    out.random_(0, 2, generator=generator).mul_(2).sub_(1)
