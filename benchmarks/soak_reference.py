"""Random soak cases and a vectorized torch reference that checks them on the device.

:mod:`vllm_a2a_plugin.reference` loops over ranks and tokens on the host: right
for tests, far too slow to check a million rounds. This module computes the same
semantics for every rank at once with a few batched torch ops on whatever
device the inputs live on, and counts mismatches into a device tensor, so the
soak (``benchmarks/soak.py``) checks every round without a host sync and can
capture rounds, checks included, in CUDA graphs. ``tests/test_soak_cpu.py``
holds this checker against :mod:`vllm_a2a_plugin.reference` on CPU.

Shapes: ``P`` ranks, ``M`` runtime max tokens, ``K`` top-k, ``H`` hidden,
``C`` scale columns, ``E`` experts. Per-round inputs are padded to ``[P, M, ...]``
(sender-major); rank ``s`` dispatches the first ``counts[s]`` rows of its block.

Semantics the checker encodes (the kernels', design §4): a top-k id outside
``[0, E)`` is a skipped slot (no rank receives it; every rank's received id
there is its padding id with weight 0; combine leaves it out), which is what
the kernels do with the host-side id check off.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_a2a_plugin.padding import padding_ids_for_ranks
from vllm_a2a_plugin.workspace import AllToAllSpec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}
EP_SIZES = (2, 3, 4, 6, 8)
HIDDENS = (128, 256, 384, 512, 768, 1024)
MODES = ("split", "concurrent")
# Mismatch counters, one slot each in the device tensor the checks add to.
KINDS = ("recv_topk_ids", "recv_topk_weights", "recv_x", "recv_x_scales", "combine")
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


@dataclass(frozen=True)
class SoakCase:
    """One workspace configuration of the soak: a random draw of every dimension.

    Attributes:
        ep_size: ``P``.
        capacity: the workspace's ``max_tokens_per_rank``.
        hidden: ``H``.
        top_k: ``K``.
        num_experts: ``E``.
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp8"`` (fp8 sends float32 1x128 scales
            and combines in bf16).
        owner: ``[E]`` rank owning each expert (any table of ranks).
        mode: :class:`~vllm_a2a_plugin.LocalRanks` mode.
    """

    ep_size: int
    capacity: int
    hidden: int
    top_k: int
    num_experts: int
    dtype: str
    owner: tuple[int, ...]
    mode: str

    @property
    def dispatch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def combine_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "fp8" else DTYPES[self.dtype]

    @property
    def scale_cols(self) -> int:
        return self.hidden // 128 if self.dtype == "fp8" else 0

    def spec(self) -> AllToAllSpec:
        return AllToAllSpec(ep_size=self.ep_size, max_tokens_per_rank=self.capacity,
                            hidden_size=self.hidden, top_k=self.top_k,
                            num_experts=self.num_experts, dispatch_dtype=self.dispatch_dtype,
                            scale_cols=self.scale_cols, combine_dtype=self.combine_dtype)

    def owner_tensor(self) -> torch.Tensor:
        """``[E]`` int32 on the CPU."""
        return torch.tensor(self.owner, dtype=torch.int32, device="cpu")

    def describe(self) -> dict:
        return dict(ep_size=self.ep_size, capacity=self.capacity, hidden=self.hidden,
                    top_k=self.top_k, num_experts=self.num_experts, dtype=self.dtype,
                    mode=self.mode, owner=list(self.owner))


def random_case(rng: random.Random, *, ep_size: int | None = None,
                modes: Sequence[str] = MODES, max_capacity: int = 16) -> SoakCase:
    """A random case; ``ep_size`` fixed when given (the soak cycles through them)."""
    p = ep_size if ep_size is not None else rng.choice(EP_SIZES)
    top_k = rng.randint(1, 16)
    num_experts = rng.choice([top_k, top_k + 1, top_k + p, 2 * top_k + p,
                              max(top_k, 32), max(top_k, 64), max(top_k, 256)])
    if rng.random() < 0.25:  # vLLM's linear placement (experts split in order)
        owner = tuple(min(e * p // num_experts, p - 1) for e in range(num_experts))
    else:  # any table of ranks: ranks with no expert, one rank with most of them
        owner = tuple(rng.randrange(p) for _ in range(num_experts))
    return SoakCase(ep_size=p, capacity=rng.randint(1, max_capacity), hidden=rng.choice(HIDDENS),
                    top_k=top_k, num_experts=num_experts, dtype=rng.choice(list(DTYPES)),
                    owner=owner, mode=rng.choice(list(modes)))


def random_counts(rng: random.Random, ep_size: int, capacity: int) -> list[int]:
    """Tokens per rank in ``[0, capacity]``: often some ranks at 0, sometimes all."""
    draw = rng.random()
    if draw < 1 / 16:
        return [0] * ep_size
    counts = [rng.randint(0, capacity) for _ in range(ep_size)]
    if draw < 0.5:
        for rank in rng.sample(range(ep_size), rng.randint(1, ep_size - 1)):
            counts[rank] = 0
    return counts


def random_runtime_max(rng: random.Random, counts: Sequence[int], capacity: int) -> int:
    """``M`` of a step: the largest count (vLLM's DP chunk), or padded up toward capacity."""
    largest = max(counts)
    return largest if rng.random() < 0.6 else rng.randint(largest, capacity)


@dataclass
class RoundInputs:
    """Every rank's inputs of one round, padded to ``[P, M, ...]``.

    Attributes:
        counts: tokens per rank.
        runtime_max_tokens: ``M``.
        x: ``[P, M, H]`` dispatch dtype.
        x_scales: ``[P, M, C]`` float32, or None.
        topk_ids: ``[P, M, K]`` int32.
        topk_weights: ``[P, M, K]`` float32.
        token_valid: ``[P, M]`` bool, row ``t`` of rank ``s`` is a real token.
        y: ``[P, P * M, H]`` combine dtype: what each rank's experts leave in its
            combine input (slot ``s * M + t`` for token ``t`` of sender ``s``).
    """

    counts: list[int]
    runtime_max_tokens: int
    x: torch.Tensor
    x_scales: torch.Tensor | None
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    token_valid: torch.Tensor
    y: torch.Tensor

    def per_rank(self, t: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Rank ``s``'s ``[counts[s], ...]`` rows of a padded tensor (contiguous views)."""
        return [None if t is None else t[s, :n] for s, n in enumerate(self.counts)]


def generate_round(case: SoakCase, counts: Sequence[int], runtime_max_tokens: int,
                   device: torch.device | str, *, generator: torch.Generator | None = None
                   ) -> RoundInputs:
    """Random inputs on ``device`` with device-side ops only (CUDA-graph capturable).

    Top-k ids are distinct per token, as routers produce, with some slots -1 (no
    expert); padding rows beyond a rank's count hold random data too, which the
    kernels must ignore.
    """
    p, m, k, e, h = case.ep_size, runtime_max_tokens, case.top_k, case.num_experts, case.hidden
    device = torch.device(device)
    scores = torch.rand((p, m, e), generator=generator, device=device, dtype=torch.float32)
    topk_ids = scores.topk(k, dim=-1).indices.to(torch.int32)
    # About 1 slot in 16 is -1, "no expert" (vLLM's routers mark padding tokens'
    # slots so); the kernels skip such slots and the checker expects them skipped.
    no_expert = torch.rand((p, m, k), generator=generator, device=device) < 1 / 16
    topk_ids = torch.where(no_expert, torch.full_like(topk_ids, -1), topk_ids)
    weights = torch.rand((p, m, k), generator=generator, device=device, dtype=torch.float32)
    x = torch.randn((p, m, h), generator=generator, device=device, dtype=torch.float32)
    if case.dtype == "fp8":
        x = (x * 64).clamp(-448, 448)
    x = x.to(case.dispatch_dtype)
    scales = None
    if case.scale_cols:
        scales = torch.rand((p, m, case.scale_cols), generator=generator, device=device,
                            dtype=torch.float32)
    y = torch.randn((p, p * m, h), generator=generator, device=device,
                    dtype=torch.float32).to(case.combine_dtype)
    # Fills, not a host-to-device copy of the counts: nothing here may sync
    # or copy from pageable memory while a CUDA graph is being captured.
    token_valid = torch.zeros((p, m), dtype=torch.bool, device=device)
    for rank, n in enumerate(counts):
        if n:
            token_valid[rank, :n] = True
    return RoundInputs(counts=list(counts), runtime_max_tokens=m, x=x, x_scales=scales,
                       topk_ids=topk_ids, topk_weights=weights, token_valid=token_valid, y=y)


@dataclass
class Expected:
    """What every rank must receive, as ``[P(receiver), P(sender), M, ...]``.

    Attributes:
        topk_ids: ``[P, P, M, K]`` int32, padding id where the receiver does not
            own the expert, the slot is empty, or the id is out of range.
        topk_weights: ``[P, P, M, K]`` float32, 0 where padded.
        slot_valid: ``[P, P, M]`` bool, the receiver gets sender's token ``t``.
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    slot_valid: torch.Tensor


class Checker:
    """The vectorized reference of one case, on one device.

    Args:
        case: owner table and sizes.
        device: where the inputs (and the checks) live.
    """

    def __init__(self, case: SoakCase, device: torch.device | str):
        self.case = case
        self.device = torch.device(device)
        owner_cpu = case.owner_tensor()
        self.owner = owner_cpu.to(self.device, torch.int64)
        self.padding_ids = padding_ids_for_ranks(owner_cpu, case.ep_size)
        self.pad_ids = torch.tensor(self.padding_ids, dtype=torch.int32,
                                    device="cpu").to(self.device)
        self.ranks = torch.arange(case.ep_size, dtype=torch.int64,
                                  device="cpu").to(self.device)

    def expected_dispatch(self, inputs: RoundInputs) -> Expected:
        """Every receiver's ids, weights and which slots carry a token."""
        e = self.case.num_experts
        ids = inputs.topk_ids.to(torch.int64)
        in_range = (ids >= 0) & (ids < e)
        owner_of = torch.where(in_range, self.owner[ids.clamp(0, e - 1)], -1)  # [P, M, K]
        owner_of = torch.where(inputs.token_valid[..., None], owner_of, -1)
        local = owner_of[None] == self.ranks[:, None, None, None]  # [P(r), P(s), M, K]
        pads = self.pad_ids[:, None, None, None]
        exp_ids = torch.where(local, inputs.topk_ids[None], pads)
        exp_w = torch.where(local, inputs.topk_weights[None], 0.0)
        return Expected(topk_ids=exp_ids, topk_weights=exp_w, slot_valid=local.any(dim=-1))

    def expected_combine(self, inputs: RoundInputs, expected: Expected) -> torch.Tensor:
        """``[P(sender), M, H]``: each token's sum over its distinct target ranks.

        Summed in float32 in ascending rank order from +0, as the kernel does,
        then rounded once to the combine dtype: the kernel's result bit for bit.
        """
        p, m, h = self.case.ep_size, inputs.runtime_max_tokens, self.case.hidden
        y = inputs.y.view(p, p, m, h)  # [P(r), P(s), M, H]
        # Non-targets add +0.0, which changes no sum that starts at +0 (the sum is
        # never -0 then). One op per rank: a reduction over r would not fix the order.
        parts = torch.where(expected.slot_valid[..., None], y.float(), 0.0)
        acc = parts[0]
        for r in range(1, p):
            acc = acc + parts[r]
        return (acc + 0.0).to(self.case.combine_dtype)

    def dispatch_mismatches(self, results: Sequence, inputs: RoundInputs,
                            expected: Expected) -> torch.Tensor:
        """``[len(KINDS)]`` int64 counts of wrong received elements (combine slot 0).

        ``results``: one :class:`~vllm_a2a_plugin.all_to_all.DispatchResult` per
        rank (``recv_*`` as ``[P * M, ...]``). Payloads are compared bit for bit
        (NaN and Inf included) on slots that carry a token; ids and weights on
        every slot.
        """
        p, m = self.case.ep_size, inputs.runtime_max_tokens

        def stacked_bits(name: str) -> torch.Tensor:
            """``[P(r), P(s), M, ...]`` raw bits of every rank's ``name`` (integer
            dtypes stack everywhere; float8 need not)."""
            got = torch.stack([_bits(getattr(res, name)) for res in results])
            return got.view(p, p, m, *got.shape[2:])

        valid = expected.slot_valid[..., None]
        wrong_ids = (stacked_bits("recv_topk_ids") != expected.topk_ids).sum()
        wrong_w = (stacked_bits("recv_topk_weights") != _bits(expected.topk_weights)).sum()
        wrong_x = ((stacked_bits("recv_x") != _bits(inputs.x)[None]) & valid).sum()
        if inputs.x_scales is not None:
            wrong_scales = ((stacked_bits("recv_x_scales") != _bits(inputs.x_scales)[None])
                            & valid).sum()
        else:
            wrong_scales = torch.zeros((), dtype=torch.int64, device=self.device)
        zero = torch.zeros((), dtype=torch.int64, device=self.device)
        return torch.stack([wrong_ids, wrong_w, wrong_x, wrong_scales, zero])

    def combine_mismatches(self, outputs: torch.Tensor, inputs: RoundInputs,
                           expected: Expected) -> torch.Tensor:
        """``[len(KINDS)]`` int64, the combine slot counting wrong output elements.

        ``outputs``: ``[P, M, H]``, rank ``s``'s result in its first
        ``counts[s]`` rows (rows beyond are not compared). Equal bits, or NaN
        on both sides (the kernel and torch write different NaN payloads).
        """
        want = self.expected_combine(inputs, expected)
        same = (_bits(outputs) == _bits(want)) | (outputs.isnan() & want.isnan())
        wrong = (~same & inputs.token_valid[..., None]).sum()
        zero = torch.zeros((), dtype=torch.int64, device=self.device)
        return torch.stack([zero, zero, zero, zero, wrong])


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` as an integer tensor of the same shape."""
    return t.view(_BITS_DTYPE[t.element_size()])


class ReferenceRanks:
    """:class:`~vllm_a2a_plugin.LocalRanks`' interface over :mod:`vllm_a2a_plugin.reference`.

    Lets the soak's own round loop run on CPU (CI), where the kernels cannot:
    then the loop, the generator and the checker's math are exercised against
    the host reference instead of the kernels.
    """

    def __init__(self, case: SoakCase):
        self.case = case
        self.spec = case.spec()
        self.expert_owner = case.owner_tensor()
        self._topk_ids: list[torch.Tensor] = []
        self._runtime_max_tokens = 0

    def dispatch(self, xs, topk_ids, topk_weights=None, *, x_scales=None,
                 runtime_max_tokens=None):
        from vllm_a2a_plugin.reference import dispatch_reference

        self._topk_ids = list(topk_ids)
        self._runtime_max_tokens = runtime_max_tokens
        return dispatch_reference(xs=xs, topk_ids=topk_ids, topk_weights=topk_weights,
                                  x_scales=x_scales, expert_owner=self.expert_owner,
                                  runtime_max_tokens=runtime_max_tokens)

    def combine(self, ys, outs):
        from vllm_a2a_plugin.reference import combine_reference

        results = combine_reference(ys=ys, topk_ids=self._topk_ids,
                                    expert_owner=self.expert_owner,
                                    runtime_max_tokens=self._runtime_max_tokens,
                                    out_dtype=self.spec.combine_dtype)
        for out, result in zip(outs, results):
            out.copy_(result)
        return outs

    def synchronize(self) -> None:
        """Nothing runs asynchronously."""

    def recover(self) -> None:
        """Nothing to reset."""
