"""Which adapter version sits in which bank slot: LRU, pinned while rows use it, drainable.

Slot 0 is the base model (all zeros, never filled). A request whose adapter is not resident takes a
never-filled slot, else evicts the least recently used slot that no running row uses. A slot in use
is never evicted: a request that finds every slot busy waits in the queue. So that it cannot wait
forever behind a steady stream of requests for resident adapters, the scheduler then *drains* one
busy slot: no new row joins it, and once its rows finish the waiting request takes it.

Pure Python on hashable handles: the weights themselves are copied by the runner's WeightBank.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

BASE_SLOT = 0


@dataclass(frozen=True)
class SlotGrant:
    slot: int
    fill: bool  # the adapter must be copied into the slot before the row runs


class SlotTable:
    def __init__(self, max_slots: int):
        if max_slots < 1:
            raise ValueError(f"max_slots must be at least 1 (got {max_slots})")
        self.max_slots = max_slots
        self._slot_of: dict[Hashable, int] = {}
        self._owner: dict[int, Hashable] = {}
        self._users: dict[int, int] = {}  # slot -> running rows on it
        self._idle: OrderedDict[int, None] = OrderedDict()  # resident, unused slots: LRU first
        self._free = list(range(max_slots, 0, -1))  # never-filled slots, popped from the end
        self.draining: int | None = None  # a busy slot no new row may join (see drain_one)
        self.fills = 0  # adapter copies into a slot (a metric: swapping cost)

    def acquire(self, adapter: Hashable | None) -> SlotGrant | None:
        """The slot for `adapter` (None = base) with one more user; None when every slot is busy."""
        if adapter is None:
            return SlotGrant(BASE_SLOT, fill=False)
        slot = self._slot_of.get(adapter)
        fill = False
        if slot is not None and slot == self.draining:
            if slot in self._users:
                return None
            self.draining = None  # drained; the waiting request came first in the queue if it still waits
        if slot is None:
            slot = self._take_slot()
            if slot is None:
                return None
            self._slot_of[adapter] = slot
            self._owner[slot] = adapter
            self.fills += 1
            fill = True
            self.draining = None  # a waiting adapter got its slot
        self._idle.pop(slot, None)
        self._users[slot] = self._users.get(slot, 0) + 1
        return SlotGrant(slot, fill)

    def drain_one(self) -> None:
        """A request waits for a slot: stop new rows joining the busy slot with the fewest rows."""
        if self.draining is None and self._users:
            self.draining = min(self._users, key=self._users.__getitem__)

    def release(self, slot: int) -> None:
        if slot == BASE_SLOT:
            return
        self._users[slot] -= 1
        if self._users[slot] == 0:
            del self._users[slot]
            self._idle[slot] = None  # most recently used at the end

    def forget(self, adapter: Hashable) -> bool:
        """Drop an unloaded adapter version from its slot; False (nothing done) while rows still use it."""
        slot = self._slot_of.get(adapter)
        if slot is None:
            return True
        if slot in self._users:
            return False
        del self._slot_of[adapter]
        del self._owner[slot]
        self._idle.pop(slot, None)
        self._free.append(slot)
        if self.draining == slot:
            self.draining = None
        return True

    def evicts_none(self, adapter: Hashable) -> bool:
        """Whether a row for `adapter` takes no other adapter's slot: it has one, or a never-filled slot is free."""
        return adapter in self._slot_of or bool(self._free)

    def resident(self) -> dict[int, Hashable]:
        return dict(self._owner)

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        if not self._idle:
            return None
        slot, _ = self._idle.popitem(last=False)
        del self._slot_of[self._owner.pop(slot)]
        return slot
