"""numba kernels of the DRAM tier: a partitioned open-addressing hash map from int64 keys to rows.

Written by hand (not a library dict) because the map must live in shared memory, be read by several processes
at once without locks, and do whole batches in compiled loops. Layout of one table (all arrays are views of
one shared-memory file; P partitions, S index slots and C rows per partition):

    part   int64 [P, 8]        per partition: seq version, size, free-stack top, evictions, rejections
    slots  int64 [P*S*2]       index, linear probing from the first slot of the key's home cache line:
                               (key, record) pairs; record -1 = empty slot
    rec    int64 [P*C*W]       records of W words: version, key, last access, access count, then the values
    free   int64 [P*C]         per-partition stacks of free record numbers
    clock  int64 [8]           [0]: the access clock that orders LRU; [1], [2]: writes through to slower
                               tiers begun and finished (see DramTable.update_token)

Concurrency: one writer per table at a time (a lock the Python side holds), any number of lock-free readers.
Each record is a seqlock: a writer sets its version's writing bit, writes, then publishes a new version; a reader
copies the values between two reads of an unchanged version that is live and not being written, and checks
the record still holds its key, so it never returns a torn row nor another key's row. Deleting from a
linear-probing index shifts later entries back (no tombstones, so probes stay short under churn); a reader can
then miss a key that was only moving, so each partition has its own seq version and a reader re-probes any
miss that overlapped a structural change. A reader that cannot get a stable view in `MAX_RETRIES` tries
reports a miss: the PS then reads a slower tier, which is slower but still exact.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from recserve.ps._atomics import (
    acquire_fence,
    bfloat16_to_float32,
    fetch_add,
    load_acquire,
    prefetch,
    release_fence,
    store_release,
)

# The default "workqueue" layer aborts when two threads enter parallel kernels at once; serving calls these
# kernels from several worker threads, so ask for a thread-safe layer (OpenMP or TBB).
numba.config.THREADING_LAYER = "threadsafe"

EMPTY = -1
MAX_RETRIES = 1 << 16
CHUNK = 4096  # keys per parallel task of a lookup
LOOKUP_BLOCK = 32  # keys taken through each phase of a lookup together (see `lookup_range`)
SLOTS_PER_LINE = 4  # (key, record) index slots in a 64-byte cache line
NOT_AT_HOME = -2
# clock words
CLOCK_ACCESS, CLOCK_WRITES_STARTED, CLOCK_WRITES_FINISHED = 0, 1, 2
# part columns
P_SEQ, P_SIZE, P_FREE_TOP, P_EVICTIONS, P_REJECTED = 0, 1, 2, 3, 4
# record words before the values
R_VERSION, R_KEY, R_TIME, R_COUNT = 0, 1, 2, 3
# A record's version word: bit 0 set while a writer is in it, bit 1 set while it holds a live key, a counter
# above. The live bit matters: a reader can be led to a record that was just freed (its index entry moved
# under it), and a freed record must fail the reader's check whatever key it last held.
V_WRITING, V_LIVE, V_STEP = 1, 2, 4
RECORD_HEADER_WORDS = 4
# overflow policies, as passed to kernels
POLICY_LRU, POLICY_LFU, POLICY_RANDOM, POLICY_REJECT = 0, 1, 2, 3
# per-key outcome of a write
INSERTED, UPDATED, REJECTED, ABSENT = 0, 1, 2, 3

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_S32 = np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)


def widen(value):
    """A stored row value as float32, in a kernel: float32 as it is; uint16, the bits of a bfloat16 (a
    float16 table's rows, also uint16, never reach the kernels that add rows: see `DramTable.max_fused_keys`)."""
    raise NotImplementedError("widen runs inside numba kernels only")


@overload(widen, inline="always")
def _widen(value):
    if value == types.uint16:
        return lambda value: bfloat16_to_float32(value)
    return lambda value: value


@njit(inline="always", cache=True)
def mix64(key):
    """murmur3's 64-bit finaliser: spreads sequential ids over partitions and slots."""
    x = np.uint64(key)
    x ^= x >> _S33
    x *= _M1
    x ^= x >> _S33
    x *= _M2
    x ^= x >> _S33
    return x


@njit(inline="always", cache=True)
def partition_of(key, num_partitions):
    # the low 32 bits scaled to [0, num_partitions) by a multiply and a shift: a modulo by a count known only
    # at run time is a division, tens of cycles, paid several times per key looked up
    return np.int64(((mix64(key) & _LOW32) * np.uint64(num_partitions)) >> _S32)


@njit(inline="always", cache=True)
def home_slot(key, num_slots):
    """Where probing for key starts: the first slot of its home cache line (see `lookup_range`)."""
    return np.int64((mix64(key) >> _S32) & np.uint64(num_slots - SLOTS_PER_LINE))


@njit(cache=True)
def partitions_of(keys, num_partitions):
    out = np.empty(keys.size, dtype=np.int64)
    for i in range(keys.size):
        out[i] = partition_of(keys[i], num_partitions)
    return out


@njit(inline="always", cache=True)
def find_slot(slots, p, num_slots, key):
    """Index entry of key in partition p, or -1."""
    base = p * num_slots
    s = home_slot(key, num_slots)
    for _ in range(num_slots):
        e = base + s
        if slots[2 * e + 1] == EMPTY:
            return -1
        if slots[2 * e] == key:
            return e
        s = (s + 1) & (num_slots - 1)
    return -1


@njit(inline="always", cache=True)
def locate(part, slots, num_slots, key):
    """Record of key, or -1 for a miss that no concurrent move could have caused."""
    p = partition_of(key, part.shape[0])
    for _ in range(MAX_RETRIES):
        seq = load_acquire(part[p], P_SEQ)
        if seq & 1:
            continue
        e = find_slot(slots, p, num_slots, key)
        if e >= 0:
            r = slots[2 * e + 1]
            if r >= 0:
                return r
            continue
        acquire_fence()
        if load_acquire(part[p], P_SEQ) == seq:
            return -1
    return -1


@njit(inline="always", cache=True)
def copy_record(rec, values, r, words, offset, key, out_row):
    """Copy record r (>= 0) into out_row if it holds key and no writer touched it meanwhile (the seqlock read)."""
    head = r * words
    version = load_acquire(rec, head + R_VERSION)
    if version & (V_WRITING | V_LIVE) != V_LIVE:
        return False
    owner = rec[np.uint64(head + R_KEY)]
    row = np.uint64(r)
    for c in range(out_row.size):
        # an unsigned index: numba then skips its negative-index wraparound test, and the copy vectorizes (4x)
        out_row[np.uint64(c)] = values[row, np.uint64(offset + c)]
    acquire_fence()
    return load_acquire(rec, head + R_VERSION) == version and owner == key


@njit(inline="always", cache=True)
def home_entry(key, num_partitions, num_slots):
    return partition_of(key, num_partitions) * num_slots + home_slot(key, num_slots)


@njit(inline="always", cache=True)
def prefetch_record(rec, r, words):
    head = r * words
    for w in range(0, words, 8):  # a cache line is 8 words; records need not start on a line
        prefetch(rec, head + w)
    prefetch(rec, head + words - 1)


@njit(inline="always", cache=True)
def read_row(part, slots, rec, values, num_slots, words, offset, key, r, out_row):
    """The record that holds key after a seqlock-checked copy into out_row, or -1 (a miss)."""
    for _ in range(MAX_RETRIES):
        if r < 0:
            return -1
        if copy_record(rec, values, r, words, offset, key, out_row):
            return r
        r = locate(part, slots, num_slots, key)  # it moved or changed while we looked: start again
    return -1


@njit(inline="always", cache=True)
def find_records(part, slots, rec, keys, lo, hi, where, home, num_slots, words):
    """The first two phases of a lookup, over keys[lo:hi] (at most LOOKUP_BLOCK keys): where[j - lo] = the record
    of keys[j], or -1; every found record prefetched (see `lookup_kernel`)."""
    num_partitions = part.shape[0]
    # Unsigned indices in the hot loops: numba then skips its negative-index wraparound, a compare and a
    # select on every access.
    for j in range(lo, hi):
        e = home_entry(keys[np.uint64(j)], num_partitions, num_slots)
        home[np.uint64(j - lo)] = e
        prefetch(slots, 2 * e)
    away = 0
    for j in range(lo, hi):
        # Nearly every key sits in its home line (the index is at most half full): all four slots are
        # compared without a branch, so the core never waits on this line's arrival to guess where to go
        # next. The few others take the full probe below.
        line = np.uint64(2 * home[np.uint64(j - lo)])  # the word of the line's first slot
        key = keys[np.uint64(j)]
        r = NOT_AT_HOME
        for w in range(SLOTS_PER_LINE):
            held = slots[line + np.uint64(2 * w + 1)]
            r = held if (slots[line + np.uint64(2 * w)] == key) & (held >= 0) else r
        where[np.uint64(j - lo)] = r
        away += r == NOT_AT_HOME
        prefetch_record(rec, max(r, 0), words)
    if away:
        for j in range(lo, hi):
            if where[j - lo] == NOT_AT_HOME:
                where[j - lo] = locate(part, slots, num_slots, keys[j])
                prefetch_record(rec, max(where[j - lo], 0), words)


@njit(inline="always", cache=True)
def mark_used(rec, where, lo, hi, words, clock_now, track_count, stamp_once):
    """Each hit's recency (and use count), in a loop of its own while the block's records are in cache: stored
    inside the copy loop, into the memory it reads, it cost ~70 instructions a key (the compiler must then
    assume every array read may have changed) and made lookups 1.2-1.7x slower; stored after the whole
    chunk, it missed the cache again. A time can land on a record that was just reused for another key: it
    only orders evictions, and never touches a row.

    With stamp_once (the parallel kernels, when more than one thread runs them), a record takes one time per call,
    at its first use in it (calls' clocks never overlap): a hot row that the call's threads all read is then
    not written at every use, which bounced its cache line between their cores. Pooled Zipf(1.05) lookups on
    two threads, 4M x 32: 1.09-1.29x the keys/s; on one thread the extra read and branch cost 1-8%."""
    for j in range(lo, hi):
        r = where[np.uint64(j - lo)]
        if r >= 0:
            if not stamp_once or rec[np.uint64(r * words + R_TIME)] < clock_now:
                rec[np.uint64(r * words + R_TIME)] = clock_now + j
            if track_count:
                rec[np.uint64(r * words + R_COUNT)] += 1


@njit(inline="always", cache=True)
def lookup_range(clock_now, part, slots, rec, values, keys, out, found, lo, hi, num_slots, words, offset,
                 track_count, stamp_once):
    """Look up keys[lo:hi], LOOKUP_BLOCK keys at a time, each block in phases (see `lookup_kernel`)."""
    home = np.empty(LOOKUP_BLOCK, dtype=np.int64)
    where = np.empty(LOOKUP_BLOCK, dtype=np.int64)
    for b0 in range(lo, hi, LOOKUP_BLOCK):
        b1 = min(hi, b0 + LOOKUP_BLOCK)
        find_records(part, slots, rec, keys, b0, b1, where, home, num_slots, words)
        changed = 0
        for j in range(b0, b1):
            i = np.uint64(j)
            r = where[np.uint64(j - b0)]
            found[i] = r >= 0 and copy_record(rec, values, r, words, offset, keys[i], out[i])
            changed += r >= 0 and not found[i]
        if changed:  # a writer moved or rewrote the record meanwhile: find the key again, out of the hot loop
            for j in range(b0, b1):
                if where[j - b0] >= 0 and not found[j]:
                    where[j - b0] = read_row(part, slots, rec, values, num_slots, words, offset, keys[j],
                                             where[j - b0], out[j])
                    found[j] = where[j - b0] >= 0
        mark_used(rec, where, b0, b1, words, clock_now, track_count, stamp_once)


@njit(inline="always", cache=True)
def task_keys(n, threads):
    """Keys per task of a parallel kernel: about CHUNK, in a number of tasks that the threads divide evenly.
    numba's OpenMP layer gives each thread an equal run of a prange's iterations, so 5 tasks (20k keys) on two
    threads took as long as 6."""
    per_thread = max(1, round(n / (threads * CHUNK)))
    return max(1, -(-n // (threads * per_thread)))


@njit(parallel=True, nogil=True, cache=True)
def lookup_kernel(clock, part, slots, rec, values, keys, out, found, num_slots, words, offset, track_count,
                  threads):
    """out[i] = row of keys[i] where found[i]; marks each hit as just used. `threads`: how many threads numba
    runs it on (numba.get_num_threads(): the kernel cannot ask, and stay cached).

    Each key costs two dependent cache misses (index slot, then record) where a gather by known row index
    costs one. Keys go through them a block at a time, each phase over the whole block: fetch every home line,
    then find every key among its line's four slots (the few elsewhere take the probe) and fetch its record,
    then copy every row, then mark each as used. The misses of a phase are independent, so the core keeps a
    block's worth in flight; and the loops stay short and branch-light. 1.3-1.7x the keys/s of a software
    pipeline that interleaved the three steps of different keys in one loop (benchmarks/NOTES.md, phased
    lookups in home lines)."""
    n = keys.size
    now = fetch_add(clock, CLOCK_ACCESS, n)
    size = task_keys(n, threads)
    for task in prange((n + size - 1) // size):
        lo = task * size
        lookup_range(now, part, slots, rec, values, keys, out, found, lo, min(n, lo + size), num_slots, words,
                     offset, track_count, threads > 1)


# Waking the thread pool costs tens of microseconds: small batches (one item's keys) run on the caller's thread.
PARALLEL_MIN_KEYS = 4096


@njit(nogil=True, cache=True)
def lookup_kernel_serial(clock, part, slots, rec, values, keys, out, found, num_slots, words, offset, track_count):
    now = fetch_add(clock, CLOCK_ACCESS, keys.size)
    lookup_range(now, part, slots, rec, values, keys, out, found, 0, keys.size, num_slots, words, offset,
                 track_count, False)


@njit(inline="always", cache=True)
def add_record(rec, values, r, words, offset, key, out, b):
    """out[b] += record r's row, between the seqlock's two reads; False if r did not hold key or a writer was in
    it (the sum may then hold part of a row)."""
    head = r * words
    version = load_acquire(rec, head + R_VERSION)
    if version & (V_WRITING | V_LIVE) != V_LIVE:
        return False
    owner = rec[np.uint64(head + R_KEY)]
    row, bag = np.uint64(r), np.uint64(b)
    for c in range(out.shape[1]):
        out[bag, np.uint64(c)] += widen(values[row, np.uint64(offset + c)])
    acquire_fence()
    return load_acquire(rec, head + R_VERSION) == version and owner == key


@njit(cache=True)
def sum_bag_again(part, slots, rec, values, keys, offsets, out, found, b, num_slots, words, offset):
    """out[b] summed anew from seqlock-checked copies of its rows (after an add that a writer may have torn);
    returns how many of its keys were not found."""
    out[b, :] = 0
    row = np.empty(out.shape[1], dtype=values.dtype)
    missing = 0
    for j in range(offsets[b], offsets[b + 1]):
        found[j] = read_row(part, slots, rec, values, num_slots, words, offset, keys[j],
                            locate(part, slots, num_slots, keys[j]), row) >= 0
        if found[j]:
            for c in range(row.size):
                out[b, c] += widen(row[c])
        missing += not found[j]
    return missing


@njit(inline="always", cache=True)
def pool_bags(clock_now, part, slots, rec, values, keys, offsets, out, found, b0, b1, num_slots, words, offset,
              track_count, stamp_once):
    """out[b] += the row of every key of bags b0..b1 that is found; returns how many were not found.

    Each row is added into its bag straight from its record, between the seqlock's two reads: copying rows
    into a scratch block first and adding them from there took 1.09-1.14x the time on one thread (Zipf keys
    into 4M x 32, benchmarks/NOTES.md: rows added straight into their bags).
    An add that fails its check may have put part of a row into the bag, so that bag is summed again from
    checked copies once the rest is done; that needs a writer inside the record at that very moment.
    """
    home = np.empty(LOOKUP_BLOCK, dtype=np.int64)
    where = np.empty(LOOKUP_BLOCK, dtype=np.int64)
    torn = np.zeros(0, dtype=np.bool_)  # per bag, allocated at the first failed add
    b = b0
    missing = 0
    for k0 in range(offsets[b0], offsets[b1], LOOKUP_BLOCK):
        k1 = min(offsets[b1], k0 + LOOKUP_BLOCK)
        find_records(part, slots, rec, keys, k0, k1, where, home, num_slots, words)
        for j in range(k0, k1):
            while offsets[b + 1] <= j:
                b += 1
            r = where[np.uint64(j - k0)]
            added = r >= 0 and add_record(rec, values, r, words, offset, keys[np.uint64(j)], out, b)
            found[np.uint64(j)] = added
            missing += not added
            if r >= 0 and not added:
                if torn.size == 0:
                    torn = np.zeros(b1 - b0, dtype=np.bool_)
                torn[b - b0] = True
        mark_used(rec, where, k0, k1, words, clock_now, track_count, stamp_once)
    for t in range(torn.size):
        if torn[t]:
            bag = b0 + t
            missing -= offsets[bag + 1] - offsets[bag] - np.count_nonzero(found[offsets[bag] : offsets[bag + 1]])
            missing += sum_bag_again(part, slots, rec, values, keys, offsets, out, found, bag, num_slots, words,
                                     offset)
    return missing


@njit(cache=True)
def bag_tasks(offsets, keys_per_task):
    """Bag boundaries cutting the bags into runs of about keys_per_task keys (a bag is never split)."""
    bounds = [0]
    for b in range(1, offsets.size - 1):
        if offsets[b] - offsets[bounds[-1]] >= keys_per_task:
            bounds.append(b)
    bounds.append(offsets.size - 1)
    return np.array(bounds, dtype=np.int64)


@njit(parallel=True, nogil=True, cache=True)
def pooled_lookup_kernel(clock, part, slots, rec, values, keys, offsets, out, found, num_slots, words, offset,
                         track_count, threads):
    """out[b] = sum of the rows of keys[offsets[b]:offsets[b + 1]] that are found; found[i] per key; returns
    how many keys were not found (`threads` as for `lookup_kernel`).

    The lookup and the pooling in one pass, without deduplicating first: a repeated key's slot and row are
    still in cache, so reading it again costs less than hashing every key into a unique set, materialising
    one row per key and pooling those. Runs of whole bags go to threads, so no two threads add into one bag.
    """
    now = fetch_add(clock, CLOCK_ACCESS, keys.size)
    tasks = bag_tasks(offsets, task_keys(keys.size, threads))
    missing = 0
    for t in prange(tasks.size - 1):
        missing += pool_bags(now, part, slots, rec, values, keys, offsets, out, found, tasks[t], tasks[t + 1],
                             num_slots, words, offset, track_count, threads > 1)
    return missing


@njit(nogil=True, cache=True)
def pooled_lookup_kernel_serial(clock, part, slots, rec, values, keys, offsets, out, found, num_slots, words,
                                offset, track_count):
    now = fetch_add(clock, CLOCK_ACCESS, keys.size)
    return pool_bags(now, part, slots, rec, values, keys, offsets, out, found, 0, offsets.size - 1, num_slots,
                     words, offset, track_count, False)


@njit(nogil=True, cache=True)
def pooled_lookup_tables_kernel(clocks, parts, slots, recs, values, geometry, keys, key_starts, offsets,
                                offset_starts, out, out_starts, found, missing):
    """`pooled_lookup_kernel_serial` over several tables in one call: for small batches the calls from Python
    cost more than the lookups (a 1-item DIN query reads 253 tables). Table t's arrays are element t of the
    lists; its keys keys[key_starts[t]:key_starts[t + 1]], its bags' offsets (from 0)
    offsets[offset_starts[t]:offset_starts[t + 1]], its pooled rows out[out_starts[t]:out_starts[t + 1]] as
    [bags, dim], with geometry[t] = (num_slots, words, value offset, track_count, dim); missing[t] = how many of
    its keys were not found."""
    for t in range(len(parts)):
        k0, k1 = key_starts[t], key_starts[t + 1]
        o0, o1 = offset_starts[t], offset_starts[t + 1]
        bags, dim = o1 - o0 - 1, geometry[t, 4]
        pooled = out[out_starts[t] : out_starts[t] + bags * dim].reshape(bags, dim)
        now = fetch_add(clocks[t], CLOCK_ACCESS, k1 - k0)
        missing[t] = pool_bags(now, parts[t], slots[t], recs[t], values[t], keys[k0:k1], offsets[o0:o1], pooled,
                               found[k0:k1], 0, bags, geometry[t, 0], geometry[t, 1], geometry[t, 2],
                               geometry[t, 3] != 0, False)


@njit(inline="always", cache=True)
def write_record(rec, values, r, words, offset, key, row):
    head = r * words
    version = rec[head + R_VERSION]
    store_release(rec, head + R_VERSION, version | V_WRITING)
    release_fence()
    rec[head + R_KEY] = key
    for c in range(row.size):
        values[r, np.uint64(offset + c)] = row[c]
    release_fence()
    store_release(rec, head + R_VERSION, (version & ~(V_WRITING | V_LIVE)) + V_STEP + V_LIVE)


@njit(inline="always", cache=True)
def retire_record(rec, r, words):
    """Free record r: a new version without the live bit, so every reader that still holds r fails its check."""
    head = r * words
    version = rec[head + R_VERSION]
    store_release(rec, head + R_VERSION, (version & ~(V_WRITING | V_LIVE)) + V_STEP)


@njit(inline="always", cache=True)
def delete_slot(slots, p, num_slots, e):
    """Remove index entry e by shifting later entries of its probe run back (no tombstones)."""
    base = p * num_slots
    mask = num_slots - 1
    hole = e - base
    j = hole
    while True:
        j = (j + 1) & mask
        ej = base + j
        if slots[2 * ej + 1] == EMPTY:
            break
        home = home_slot(slots[2 * ej], num_slots)
        stays = (hole < home <= j) if hole <= j else (home > hole or home <= j)
        if stays:
            continue
        eh = base + hole
        slots[2 * eh] = slots[2 * ej]
        store_release(slots, 2 * eh + 1, slots[2 * ej + 1])
        hole = j
    store_release(slots, 2 * (base + hole) + 1, EMPTY)


@njit(inline="always", cache=True)
def insert_slot(slots, p, num_slots, key, r):
    base = p * num_slots
    s = home_slot(key, num_slots)
    while slots[2 * (base + s) + 1] != EMPTY:
        s = (s + 1) & (num_slots - 1)
    e = base + s
    slots[2 * e] = key
    store_release(slots, 2 * e + 1, r)  # the key is written before the entry becomes visible


@njit(inline="always", cache=True)
def free_record(part, slots, rec, free, p, num_slots, capacity, words, e):
    r = slots[2 * e + 1]
    delete_slot(slots, p, num_slots, e)
    retire_record(rec, r, words)
    top = part[p, P_FREE_TOP]
    free[p * capacity + top] = r
    part[p, P_FREE_TOP] = top + 1
    part[p, P_SIZE] -= 1


@njit(cache=True)
def evict_for_space(part, slots, rec, free, p, num_slots, capacity, words, policy, keep):
    """Evict the lowest-priority records of partition p until it holds `keep` (< capacity)."""
    size = part[p, P_SIZE]
    entries = np.empty(size, dtype=np.int64)
    n = 0
    for s in range(num_slots):
        e = p * num_slots + s
        if slots[2 * e + 1] != EMPTY:
            entries[n] = e
            n += 1
    last_use = np.empty(n, dtype=np.int64)
    for j in range(n):
        last_use[j] = rec[slots[2 * entries[j] + 1] * words + R_TIME]
    if policy == POLICY_RANDOM:
        order = np.argsort(np.random.random(n))
    else:
        order = np.argsort(last_use, kind="mergesort")
        if policy == POLICY_LFU:  # least used first, ties broken by least recent
            counts = np.empty(n, dtype=np.int64)
            for j in range(n):
                counts[j] = rec[slots[2 * entries[order[j]] + 1] * words + R_COUNT]
            order = order[np.argsort(counts, kind="mergesort")]
    victims = np.empty(n - keep, dtype=np.int64)
    for j in range(n - keep):
        victims[j] = slots[2 * entries[order[j]]]  # keys: entries move while we delete
    seq = part[p, P_SEQ]
    store_release(part[p], P_SEQ, seq + 1)
    release_fence()
    for key in victims:
        free_record(part, slots, rec, free, p, num_slots, capacity, words, find_slot(slots, p, num_slots, key))
    release_fence()
    store_release(part[p], P_SEQ, seq + 2)
    part[p, P_EVICTIONS] += n - keep


@njit(parallel=True, nogil=True, cache=True)
def write_kernel(clock, part, slots, rec, free, values, keys, rows, order, starts, status,
                 num_slots, capacity, words, offset, policy, keep, insert_new):
    """Upsert (insert_new) or overwrite-only of rows; status[i] says what happened to keys[i].

    Keys are grouped by partition (order/starts) so each partition is written by one thread, in batch order.
    """
    now = fetch_add(clock, CLOCK_ACCESS, keys.size)
    for p in prange(part.shape[0]):
        for j in range(starts[p], starts[p + 1]):
            i = order[j]
            key = keys[i]
            e = find_slot(slots, p, num_slots, key)
            if e >= 0:
                r = slots[2 * e + 1]
                write_record(rec, values, r, words, offset, key, rows[i])
                if insert_new:  # an insert is a use; a refresh from training is not
                    rec[r * words + R_TIME] = now + i
                    rec[r * words + R_COUNT] += 1
                status[i] = UPDATED
                continue
            if not insert_new:
                status[i] = ABSENT
                continue
            if part[p, P_SIZE] >= capacity:
                if policy == POLICY_REJECT:
                    part[p, P_REJECTED] += 1
                    status[i] = REJECTED
                    continue
                evict_for_space(part, slots, rec, free, p, num_slots, capacity, words, policy, keep)
            top = part[p, P_FREE_TOP] - 1
            r = free[p * capacity + top]
            part[p, P_FREE_TOP] = top
            write_record(rec, values, r, words, offset, key, rows[i])
            rec[r * words + R_TIME] = now + i
            rec[r * words + R_COUNT] = 1
            insert_slot(slots, p, num_slots, key, r)
            part[p, P_SIZE] += 1
            status[i] = INSERTED


@njit(parallel=True, nogil=True, cache=True)
def evict_kernel(part, slots, rec, free, keys, order, starts, removed, num_slots, capacity, words):
    """Remove keys; removed[i] is True where keys[i] was held."""
    for p in prange(part.shape[0]):
        if starts[p] == starts[p + 1]:
            continue
        seq = part[p, P_SEQ]
        store_release(part[p], P_SEQ, seq + 1)
        release_fence()
        for j in range(starts[p], starts[p + 1]):
            i = order[j]
            e = find_slot(slots, p, num_slots, keys[i])
            removed[i] = e >= 0
            if e >= 0:
                free_record(part, slots, rec, free, p, num_slots, capacity, words, e)
        release_fence()
        store_release(part[p], P_SEQ, seq + 2)


@njit(cache=True)
def init_table(part, slots, free, capacity):
    slots[1::2] = EMPTY
    for p in range(part.shape[0]):
        part[p, :] = 0
        part[p, P_FREE_TOP] = capacity
        for j in range(capacity):
            free[p * capacity + j] = capacity - 1 - j + p * capacity


@njit(cache=True)
def held_keys(part, slots, num_slots):
    """All keys the table holds (diagnostics and tests)."""
    out = np.empty(part[:, P_SIZE].sum(), dtype=np.int64)
    n = 0
    for e in range(part.shape[0] * num_slots):
        if slots[2 * e + 1] != EMPTY and n < out.size:
            out[n] = slots[2 * e]
            n += 1
    return out[:n]
