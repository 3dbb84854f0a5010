"""KV memory as a preallocated pool of token slots (SGLang's ``TokenToKVPool`` design).

Every layer owns a K and a V buffer of shape ``[kv_heads, num_slots + 1, head_dim]``; a token's KV lives in one
slot, the same index in every layer. Slot 0 is reserved as a padding target. Heads come first so that the keys of
a sequence gathered from its slots are, for each head, one contiguous ``[tokens, head_dim]`` block: the layout
attention reads fastest. With slots first, attention read the gathered keys with a stride: a decode step of 16
sequences over 800 tokens each ran ≈ 10 % slower on CPU (`bench/engine_prefix.py` measures decode end to end).

The allocator hands out slot indices from a free list; the radix cache and running requests hold them until they
are freed.
"""

from __future__ import annotations

import torch


class KVPoolFull(RuntimeError):
    """Not enough free slots (after eviction) for an allocation."""


class TokenSlotPool:
    """Preallocated per-layer K/V buffers plus a free list of slot indices."""

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_slots < 1:
            raise ValueError("the KV pool needs at least one slot")
        self.size = num_slots
        self.device = device
        self.dtype = dtype
        shape = (kv_heads, num_slots + 1, head_dim)
        self.k_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._free = torch.arange(1, num_slots + 1, dtype=torch.int64, device=device)
        #: Reused flat destinations of :meth:`gather` (a fresh tensor per layer cost page faults on every step).
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def available(self) -> int:
        """Free slots."""
        return int(self._free.numel())

    def alloc(self, n: int) -> torch.Tensor:
        """``n`` free slot indices; raises :class:`KVPoolFull` when fewer are free."""
        if n > self._free.numel():
            raise KVPoolFull(f"need {n} KV slots, {self._free.numel()} free")
        out, self._free = self._free[:n], self._free[n:]
        return out

    def free(self, slots: torch.Tensor) -> None:
        """Return slots to the free list."""
        if slots.numel():
            self._free = torch.cat((self._free, slots.to(self.device, torch.int64)))

    def clear(self) -> None:
        """Mark every slot free (after a cache flush with nothing running)."""
        self._free = torch.arange(1, self.size + 1, dtype=torch.int64, device=self.device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens' K/V (``[tokens, kv_heads, head_dim]``) of one layer."""
        self.k_buffers[layer].index_copy_(1, slots, k.transpose(0, 1))
        self.v_buffers[layer].index_copy_(1, slots, v.transpose(0, 1))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``slots`` (``[kv_heads, len(slots), head_dim]`` each, contiguous), copied into scratch buffers
        that the next call overwrites: use them before gathering again. Reusing the buffers avoids allocating (and
        faulting in) fresh pages for every layer of every step, which cost as much as the copy itself."""
        n = slots.numel()
        k_buf, v_buf = self.k_buffers[layer], self.v_buffers[layer]
        heads, _, head_dim = k_buf.shape
        need = heads * n * head_dim
        if self._scratch is None or self._scratch[0].numel() < need:
            size = max(need, int(1.25 * (self._scratch[0].numel() if self._scratch else 0)))
            self._scratch = (k_buf.new_empty(size), v_buf.new_empty(size))
        k_out = self._scratch[0][:need].view(heads, n, head_dim)
        v_out = self._scratch[1][:need].view(heads, n, head_dim)
        # index_select rather than k_buf[:, slots]: advanced indexing gathers scattered slots several times slower.
        torch.index_select(k_buf, 1, slots, out=k_out)
        torch.index_select(v_buf, 1, slots, out=v_out)
        return k_out, v_out

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (*self.k_buffers, *self.v_buffers))
