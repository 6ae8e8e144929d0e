"""Coordination between the threads and processes of a deployment, in one place.

- `slot_locks`: the per-slot lock taken around every slot transaction (`SlotLocks`:
  Redis, or in-process on the embedded default), and many at once for a sweep batch;
- `run_locks`: one run at a time of a periodic job (sweeps, retention, delivery);
- `markers`: named flags with a TTL (delivery kicks and reruns, scheduled retries) and
  the `BusySlots` hint.

None of it is needed for correctness — the database has the last word (the slot fence,
unique keys, conditional updates); coordination makes contention cheap and orderly.
"""
