"""The shared queue: accepted events in Redis Streams, for any number of collectors at once.

Each user's events go to one of a fixed number of partitions (a stream each, the count kept
in Redis at first use). Per user, a LIST holds the stream ids of its waiting events in order
(its line); per partition, a ZSET holds each line's head with the time it is due (the later
of its backoff and its lease), and a HASH the state of entries that were tried or leased.
A claim is a range of the due heads, then each line's first events: its cost depends on the
limit, not on the backlog. Every change is one Lua script, so one round trip, atomic.

A partition is relayed by one collector at a time: the one holding its lease key, whose
value is a fencing token (INCR at each acquisition). A background task renews the leases it
holds and takes free ones up to a fair share of the live collectors. Scripts that change a
partition's entries check the token first: a collector that lost a partition (it stalled
past its lease) changes nothing there, and the new owner sends those events again with the
same X-Outbound-GUID.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import random
import secrets
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from ..config import redact_url
from ..enrich import Record
from ..logs import Repeats, counted
from .base import (
    Claimed,
    DeadLetterFilter,
    DroppedLetters,
    QueueFull,
    QueueRefused,
    QueueStats,
    QueueUnavailable,
    dedupe_key,
    share_key,
    user_key,
)

log = logging.getLogger("collector.queue")

# The least a probe writes, as the SQLite queue's probe (a full batch of the script).
PROBE_BYTES = 64 * 1024
RETENTION_INTERVAL = 60.0  # seconds between drops of dead letters past their retention
SOCKET_TIMEOUT = 5.0  # seconds a command may wait for Redis before it counts as unavailable
CONNECT_TIMEOUT = 2.0
CLOSE_TIMEOUT = 1.0  # seconds close() waits for Redis to take a release and the disconnects
MAX_CONNECTIONS = 64  # commands beyond wait for a free connection (up to SOCKET_TIMEOUT)
LETTER_PAGE = 1000  # dead letters read per round trip
Progress = Callable[[int], None]


def partition_of(user: str, partitions: int) -> int:
    """The partition of a user's line: a stable hash (the same in every process), mod N."""
    return zlib.crc32(user.encode()) % partitions


# Helpers every script starts with. Keys are built from the prefix (ARGV[1]): this is for a
# single Redis server (or a primary with replicas), not Redis Cluster.
_LIBRARY = """
local P = ARGV[1]
local function stream(n) return P .. ':p:' .. n end
local function heads(n) return P .. ':p:' .. n .. ':heads' end
local function states(n) return P .. ':p:' .. n .. ':state' end
-- user -> 'count|last stream id' of its line's last claim, while it may be in flight
local function leased(n) return P .. ':p:' .. n .. ':leased' end
-- user -> the last stream id that a dead owner had claimed: the next claim of the line goes
-- no further, so that it is the same batch, under the same X-Outbound-GUID
local function redos(n) return P .. ':p:' .. n .. ':redo' end
local function headof(n) return P .. ':p:' .. n .. ':headof' end
local function line(user) return P .. ':line:' .. user end
-- Entries' stream ids are a sequence over all partitions (INCR), so that among heads due at
-- the same time the oldest goes first: a head's member in its ZSET is its sequence number,
-- zero-padded, then its user (members of equal score sort as strings).
local function new_id()
  return redis.call('INCR', P .. ':seq') .. '-1'
end
local function member(id, user)
  local seq = string.match(id, '^(%d+)')
  return string.rep('0', 16 - #seq) .. seq .. ':' .. user
end
local function user_of(m) return string.sub(m, 18) end
local function seq(id) return tonumber(string.match(id, '^(%d+)')) end
local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end
local function entry(n, id)
  local found = redis.call('XRANGE', stream(n), id, id)
  if #found == 0 then return nil end
  return found[1][2]
end
-- state: {attempts, available_at, lease_until, last error}
local function state(n, id)
  local raw = redis.call('HGET', states(n), id)
  if raw then return cjson.decode(raw) end
  return nil
end
-- Counters change by the script's total, once, when it ends (flush_counts).
local TALLIES = {'events', 'bytes', 'browser_events', 'browser_bytes'}
local tally = {events = 0, bytes = 0, browser_events = 0, browser_bytes = 0}
local by_client = {}
local function counts(events, size, client)
  tally.events, tally.bytes = tally.events + events, tally.bytes + size
  if client ~= '' then
    tally.browser_events = tally.browser_events + events
    tally.browser_bytes = tally.browser_bytes + size
    local held = by_client[client] or {0, 0}
    by_client[client] = {held[1] + events, held[2] + size}
  end
end
local function flush_counts()
  for _, name in ipairs(TALLIES) do
    if tally[name] ~= 0 then redis.call('HINCRBY', P .. ':counts', name, tally[name]) end
    tally[name] = 0
  end
  for client, change in pairs(by_client) do
    local left = redis.call('HINCRBY', P .. ':client_events', client, change[1])
    redis.call('HINCRBY', P .. ':client_bytes', client, change[2])
    if left <= 0 then
      redis.call('HDEL', P .. ':client_events', client)
      redis.call('HDEL', P .. ':client_bytes', client)
    end
  end
  by_client = {}
end
-- Make a user's head what its line says: its first entry, due at the later of its backoff
-- and its lease (never tried: since it was received); no head for an empty line.
local function head(n, user, id, due)
  local m = member(id, user)
  redis.call('ZADD', heads(n), due, m)
  redis.call('HSET', headof(n), user, m)
end
local function refresh(n, user)
  local old = redis.call('HGET', headof(n), user)
  if old then redis.call('ZREM', heads(n), old) end
  local first = redis.call('LINDEX', line(user), 0)
  if not first then
    redis.call('HDEL', headof(n), user)
    redis.call('HDEL', leased(n), user)
    redis.call('HDEL', redos(n), user)
    return
  end
  local s = state(n, first)
  local due
  if s then
    due = math.max(s[2], s[3])
  else
    local fields = entry(n, first)
    due = fields and tonumber(field(fields, 't')) or 0
  end
  head(n, user, first, due)
end
local function owns(n, token)
  return redis.call('GET', P .. ':lease:' .. n) == token
end
-- Delete a delivered (or dead-lettered) entry; its fields, or nil when it is gone already.
-- Lines whose heads changed, refreshed once each when the script ends (a batch's acks
-- change one head many times).
local touched, touched_order = {}, {}
local function touch(n, user)
  local key = n .. ' ' .. user
  if not touched[key] then
    touched[key] = true
    table.insert(touched_order, {n, user})
  end
end
local function refresh_touched()
  for _, line_of in ipairs(touched_order) do refresh(line_of[1], line_of[2]) end
  touched, touched_order = {}, {}
end
local function remove(n, id, user)
  local fields = entry(n, id)
  if not fields then return nil end
  redis.call('XDEL', stream(n), id)
  redis.call('LREM', line(user), 1, id)
  redis.call('HDEL', states(n), id)
  counts(-1, -tonumber(field(fields, 's')), field(fields, 'c'))
  touch(n, user)
  return fields
end
local function depth()
  flush_counts()
  return tonumber(redis.call('HGET', P .. ':counts', 'events')) or 0
end
-- Dead letters past their retention (failed before `cutoff`, '' for none) and beyond `most`,
-- 1000 of each at most a call, so that no script holds Redis long; the rest go next time.
local function retain(cutoff, most)
  local expired, over = 0, 0
  local function drop(ids)
    for _, id in ipairs(ids) do
      redis.call('DEL', P .. ':dl:' .. id)
      redis.call('ZREM', P .. ':dl:ids', id)
      redis.call('ZREM', P .. ':dl:time', id)
    end
    return #ids
  end
  if cutoff ~= '' then
    expired = drop(redis.call('ZRANGEBYSCORE', P .. ':dl:time', '-inf', '(' .. cutoff,
      'LIMIT', 0, 1000))
  end
  if most > 0 then
    local extra = redis.call('ZCARD', P .. ':dl:ids') - most
    if extra > 0 then
      over = drop(redis.call('ZRANGE', P .. ':dl:ids', 0, math.min(extra, 1000) - 1))
    end
  end
  return {expired, over}
end
"""

# ARGV: prefix, dedupe window (ms, 0: off), max events, max bytes, share per IP, browser
# share, then per record: dedupe key, partition, user, client ('' for a server token's),
# received_at, body. Checks every limit before it writes anything; {duplicates, depth, ''}
# or {0, depth, the limit that refused}.
_PUT = (
    _LIBRARY
    + """
local window = tonumber(ARGV[2])
local max_events, max_bytes = tonumber(ARGV[3]), tonumber(ARGV[4])
local per_ip, browsers = tonumber(ARGV[5]), tonumber(ARGV[6])
local c = redis.call('HMGET', P .. ':counts', 'events', 'bytes', 'browser_events', 'browser_bytes')
local events, bytes = tonumber(c[1]) or 0, tonumber(c[2]) or 0
local browser_events, browser_bytes = tonumber(c[3]) or 0, tonumber(c[4]) or 0
local n, size = 0, 0
local mine, clients = {}, {}
for i = 7, #ARGV, 6 do
  local client, length = ARGV[i + 3], #ARGV[i + 5]
  n, size = n + 1, size + length
  if client ~= '' then
    if not mine[client] then
      mine[client] = {0, 0}
      table.insert(clients, client)
    end
    mine[client][1] = mine[client][1] + 1
    mine[client][2] = mine[client][2] + length
  end
end
local depth_now = events
if events + n > max_events then return {0, depth_now, 'queue_max_events'} end
if bytes + size > max_bytes then return {0, depth_now, 'queue_max_bytes'} end
if #clients > 0 then
  local more_events, more_bytes = 0, 0
  for _, client in ipairs(clients) do
    more_events = more_events + mine[client][1]
    more_bytes = more_bytes + mine[client][2]
  end
  if browser_events + more_events > browsers * max_events
      or browser_bytes + more_bytes > browsers * max_bytes then
    return {0, depth_now, 'queue_browser_share'}
  end
  for _, client in ipairs(clients) do
    local held_events = tonumber(redis.call('HGET', P .. ':client_events', client)) or 0
    local held_bytes = tonumber(redis.call('HGET', P .. ':client_bytes', client)) or 0
    if held_events + mine[client][1] > per_ip * max_events
        or held_bytes + mine[client][2] > per_ip * max_bytes then
      return {0, depth_now, 'queue_share_per_ip'}
    end
  end
end
local duplicates = 0
for i = 7, #ARGV, 6 do
  local key, n, user, client = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local received, body = ARGV[i + 4], ARGV[i + 5]
  if window > 0 and not redis.call('SET', P .. ':seen:' .. key, '1', 'NX', 'PX', window) then
    duplicates = duplicates + 1
  else
    local id = redis.call('XADD', stream(n), new_id(), 'b', body, 'u', user, 'c', client,
      's', #body, 'r', received, 't', received)
    if redis.call('RPUSH', line(user), id) == 1 then head(n, user, id, received) end
    counts(1, #body, client)
  end
end
return {duplicates, depth(), ''}
"""
)

# ARGV: prefix, now, lease until, limit, depth, least lease left (ms), then (partition,
# token) of each partition held. The due heads of the partitions still held, oldest due
# first, each with up to `depth` events of its line; each entry as {partition, stream id,
# user, attempts, received_at, body, identified}.
_CLAIM = (
    _LIBRARY
    + """
local now, limit, deep = ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5])
local leased_until = tonumber(ARGV[3])
local spare = tonumber(ARGV[6])
local due = {}
for i = 7, #ARGV, 2 do
  local n, token = ARGV[i], ARGV[i + 1]
  if owns(n, token) and redis.call('PTTL', P .. ':lease:' .. n) >= spare then
    local found = redis.call('ZRANGEBYSCORE', heads(n), '-inf', now,
      'WITHSCORES', 'LIMIT', 0, limit)
    for j = 1, #found, 2 do
      table.insert(due, {tonumber(found[j + 1]), found[j], n})
    end
  end
end
table.sort(due, function(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  return a[2] < b[2]
end)
local claimed = {}
for i = 1, math.min(limit, #due) do
  local n, user = due[i][3], user_of(due[i][2])
  local identified = redis.call('SISMEMBER', P .. ':identified', user)
  local ids = redis.call('LRANGE', line(user), 0, deep - 1)
  local redo = redis.call('HGET', redos(n), user)
  if redo then redis.call('HDEL', redos(n), user) end
  local taken, last = 0, nil
  for _, id in ipairs(ids) do
    if redo and seq(id) > seq(redo) then break end
    local fields = entry(n, id)
    if fields then
      local received = field(fields, 'r')
      local s = state(n, id) or {0, tonumber(field(fields, 't')), 0, ''}
      s[3] = leased_until
      redis.call('HSET', states(n), id, cjson.encode(s))
      table.insert(claimed, {n, id, user, s[1], received, field(fields, 'b'), identified})
      taken, last = taken + 1, id
    end
  end
  if last then
    -- A claim of fewer events than an earlier one whose leases ran out unsettled leaves
    -- theirs in place: the range a takeover looks at covers every event still leased.
    local before = redis.call('HGET', leased(n), user)
    local count = before and tonumber(string.match(before, '^(%d+)|')) or 0
    redis.call('HSET', leased(n), user, math.max(count, taken) .. '|' .. last)
  end
  refresh(n, user)
end
return claimed
"""
)

# ARGV: prefix, the retention cutoff ('' for none), the most dead letters kept (0: no cap),
# then 8 a change: kind (ack, retry, release, dead), partition, token, stream id, user, and
# three arguments (ack: identified; retry: available_at, error; dead: reason, status
# ('' for none), response, with failed_at in the retention's place: ARGV[2] is now for
# them). Returns {depth, expired, over, then per change 1 (done), 0 (fenced: partition lost)
# or -1 (no such entry)}.
_SETTLE = (
    _LIBRARY
    + """
local results = {}
local died = false
for i = 5, #ARGV, 8 do
  local kind, n, token, id, user = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local a, b, c = ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
  local result = 1
  if not owns(n, token) then
    result = 0
  elseif kind == 'ack' then
    local fields = remove(n, id, user)
    if not fields then result = -1
    elseif a == '1' then redis.call('SADD', P .. ':identified', user) end
  elseif kind == 'retry' or kind == 'release' then
    local s = state(n, id)
    local fields = entry(n, id)
    if not fields then
      result = -1
    else
      s = s or {0, tonumber(field(fields, 't')), 0, ''}
      s[3] = 0
      if kind == 'retry' then
        s[1] = s[1] + 1
        s[2] = tonumber(a)
        s[4] = b
      end
      if s[1] == 0 then
        redis.call('HDEL', states(n), id)
      else
        redis.call('HSET', states(n), id, cjson.encode(s))
      end
      touch(n, user)
    end
  elseif kind == 'dead' then
    local s = state(n, id)
    local fields = remove(n, id, user)
    if not fields then
      result = -1
    else
      local letter = redis.call('INCR', P .. ':dl:next')
      redis.call('HSET', P .. ':dl:' .. letter,
        'b', field(fields, 'b'), 'u', user, 'c', field(fields, 'c'),
        'r', field(fields, 'r'), 'f', ARGV[4], 'a', (s and s[1] or 0) + 1,
        'why', a, 'status', b, 'response', c)
      redis.call('ZADD', P .. ':dl:ids', letter, letter)
      redis.call('ZADD', P .. ':dl:time', ARGV[4], letter)
      died = true
    end
  end
  table.insert(results, result)
end
refresh_touched()
local dropped = {0, 0}
if died or ARGV[2] ~= '' then dropped = retain(ARGV[2], tonumber(ARGV[3])) end
local answer = {depth(), dropped[1], dropped[2]}
for _, result in ipairs(results) do table.insert(answer, result) end
return answer
"""
)

# ARGV: prefix, collector id, lease (ms), partitions, whether to take more ('1'/'0'), where
# to start looking for free partitions, then (partition, token) of each partition held.
# Heartbeats the member, renews the leases still ours, takes free partitions up to a fair
# share (voiding the leases of the entries their last owner had claimed). Returns {share,
# lost partitions, taken (partition, token) pairs, events interrupted}.
_TEND = (
    _LIBRARY
    + """
local me, lease, partitions, more = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local start = tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', P .. ':members', now + lease, me)
redis.call('ZREMRANGEBYSCORE', P .. ':members', '-inf', '(' .. now)
local share = math.ceil(partitions / redis.call('ZCARD', P .. ':members'))
local held, lost = 0, {}
local mine = {}
for i = 7, #ARGV, 2 do
  local n, token = ARGV[i], ARGV[i + 1]
  if owns(n, token) then
    redis.call('PEXPIRE', P .. ':lease:' .. n, lease)
    held = held + 1
    mine[n] = true
  else
    table.insert(lost, n)
  end
end
local taken, interrupted = {}, 0
if more == '1' and held < share then
  for i = 0, partitions - 1 do
    if held >= share then break end
    local n = tostring((start + i) % partitions)
    if not mine[n] and redis.call('EXISTS', P .. ':lease:' .. n) == 0 then
      local token = me .. ':' .. redis.call('INCR', P .. ':fence:' .. n)
      redis.call('SET', P .. ':lease:' .. n, token, 'PX', lease)
      -- What the last owner had claimed goes again: its leases are void.
      local lines = redis.call('HGETALL', leased(n))
      for j = 1, #lines, 2 do
        local user = lines[j]
        local count = string.match(lines[j + 1], '^(%d+)|')
        -- The redo goes as far as the last event still leased, not the claim's last: those
        -- behind it were settled (retried, released) before the owner died, their outcome
        -- stored, as the SQLite queue does (its lease marks).
        local last = nil
        for _, id in ipairs(redis.call('LRANGE', line(user), 0, tonumber(count) - 1)) do
          local s = state(n, id)
          if s and s[3] > 0 then
            last = id
            interrupted = interrupted + 1
            s[3] = 0
            if s[1] == 0 then
              redis.call('HDEL', states(n), id)
            else
              redis.call('HSET', states(n), id, cjson.encode(s))
            end
          end
        end
        if last then redis.call('HSET', redos(n), user, last) end
        refresh(n, user)
      end
      redis.call('DEL', leased(n))
      table.insert(taken, n)
      table.insert(taken, token)
      held = held + 1
    end
  end
end
return {share, lost, taken, interrupted}
"""
)

# ARGV: prefix, collector id, then (partition, token) pairs: let go of those still ours.
_RELEASE = (
    _LIBRARY
    + """
for i = 3, #ARGV, 2 do
  if owns(ARGV[i], ARGV[i + 1]) then redis.call('DEL', P .. ':lease:' .. ARGV[i]) end
end
if ARGV[2] ~= '' then redis.call('ZREM', P .. ':members', ARGV[2]) end
return 1
"""
)

# ARGV: prefix, now. Every line in backoff is due now (leases are kept).
_RESET_BACKOFF = (
    _LIBRARY
    + """
local partitions = tonumber(redis.call('GET', P .. ':partitions')) or 0
for n = 0, partitions - 1 do
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', heads(n), '(' .. ARGV[2], '+inf')) do
    local user = user_of(m)
    local first = redis.call('LINDEX', line(user), 0)
    local s = first and state(n, first)
    if s and s[2] > tonumber(ARGV[2]) then
      local fields = entry(n, first)
      s[2] = fields and tonumber(field(fields, 'r')) or 0
      redis.call('HSET', states(n), first, cjson.encode(s))
    end
    refresh(n, user)
  end
end
return 1
"""
)

# ARGV: prefix, then (dead letter id, partition) pairs: back to their users' lines, in order.
_REPLAY = (
    _LIBRARY
    + """
local moved = 0
for i = 2, #ARGV, 2 do
  local letter, n = ARGV[i], ARGV[i + 1]
  local f = redis.call('HMGET', P .. ':dl:' .. letter, 'b', 'u', 'c', 'r')
  if f[1] then
    -- Due at once, as a new event (available since 0), at the end of its user's line.
    local id = redis.call('XADD', stream(n), new_id(), 'b', f[1], 'u', f[2], 'c', f[3],
      's', #f[1], 'r', f[4], 't', 0)
    if redis.call('RPUSH', line(f[2]), id) == 1 then head(n, f[2], id, 0) end
    counts(1, #f[1], f[3])
    redis.call('DEL', P .. ':dl:' .. letter)
    redis.call('ZREM', P .. ':dl:ids', letter)
    redis.call('ZREM', P .. ':dl:time', letter)
    moved = moved + 1
  end
end
flush_counts()
return moved
"""
)

# ARGV: prefix, then dead letter ids: deleted for good.
_PURGE = (
    _LIBRARY
    + """
local purged = 0
for i = 2, #ARGV do
  purged = purged + redis.call('DEL', P .. ':dl:' .. ARGV[i])
  redis.call('ZREM', P .. ':dl:ids', ARGV[i])
  redis.call('ZREM', P .. ':dl:time', ARGV[i])
end
return purged
"""
)


_SCRIPTS = {
    "put": _PUT,
    "claim": _CLAIM,
    "settle": _SETTLE,
    "tend": _TEND,
    "release": _RELEASE,
    "reset_backoff": _RESET_BACKOFF,
    "replay": _REPLAY,
    "purge": _PURGE,
}


# An outcome to store: its kind (ack, retry, release, dead), the event's id, three arguments.
Change = tuple[str, int, str, str, str]


@dataclass(frozen=True, slots=True)
class _Lease:
    """What this process keeps of a claimed entry, for its ack, retry, release or dead letter."""

    partition: int
    token: str  # the partition's fencing token when it was claimed
    stream_id: str
    user: str
    # time.monotonic() when the claim's lease is over: past it, the entry no longer keeps its
    # partition busy (the caller's `now` is its own clock, not necessarily this one)
    until: float


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else value or ""


class RedisQueue:
    """The queue in Redis Streams, shared by every collector that names the same Redis."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "collector",
        partitions: int = 16,
        lease: float = 10.0,
        durability: str | None = None,
        dedupe_window: float = 3600.0,
        max_events: int = 2_000_000,
        max_bytes: int = 1 << 30,
        share_per_ip: float = 1.0,
        browser_share: float = 1.0,
        ipv6_prefix: int = 64,
        dead_letters_max: int = 0,
        dead_letter_days: float = 0.0,
        on_dropped: Callable[[int], object] = lambda count: None,
        owner: bool = True,
    ) -> None:
        self._url = url
        self.where = redact_url(url)  # for messages: never the password
        self._prefix = prefix
        self._configured_partitions = partitions
        self.partitions = partitions  # the count recorded in Redis wins (open)
        self._lease = lease
        self._durability = durability
        self._dedupe_window = dedupe_window
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._share_per_ip = share_per_ip
        self._browser_share = browser_share
        self._ipv6_prefix = ipv6_prefix
        self._dead_letters_max = dead_letters_max
        self._dead_letter_days = dead_letter_days
        self._owner = owner
        # This collector among the live ones: its host and pid for people, random for
        # uniqueness (a restarted process with the same pid is another member).
        self.member = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(4)}"
        self.depth = 0  # events waiting, as Redis last said
        self.interrupted = 0  # events whose delivery a previous owner did not finish
        self.fenced = 0  # outcomes refused because the partition was lost meanwhile
        self.stored = 0
        self.duplicates = 0
        self.damaged: str | None = None  # Redis has no file of ours to find corrupt
        self.last_error: str | None = None
        self.warnings: list[str] = []  # what open() found Redis cannot promise
        self.held: dict[int, str] = {}  # partition -> our fencing token
        self._draining: set[int] = set()  # held, beyond our share: let go once settled
        self._claiming = 0  # claims under way, whose entries are not in _leases yet
        self._share = partitions
        self._leases: dict[int, _Lease] = {}
        # Outcomes Redis did not take (it was down): stored once it answers again, rather
        # than their events waiting out their claim's lease to go again.
        self._unsettled: list[tuple[list[Change], float | None]] = []
        self._ids = itertools.count(1)
        self._fenced_logged: set[tuple[int, str]] = set()
        self._healthy = True
        self._retained_at = 0.0
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._tender: asyncio.Task[None] | None = None
        self._closing = False
        self._stopping = asyncio.Event()
        self._refusals = Repeats(log)
        self._drops = DroppedLetters(log, on_dropped, days=dead_letter_days, kept=dead_letters_max)
        self._tend_errors = Repeats(log)

    def __repr__(self) -> str:
        return f"RedisQueue({self.where!r}, prefix={self._prefix!r})"

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def open(self) -> None:
        """Connect, record the partition count at first use, check what Redis promises, and
        (as an owner) take a share of the partitions; QueueRefused when Redis cannot be used."""
        pool = aioredis.BlockingConnectionPool.from_url(
            self._url,
            max_connections=MAX_CONNECTIONS,
            timeout=SOCKET_TIMEOUT,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            # No retries behind our back: a script that timed out may have run, and running
            # it again would not be the same (a fencing INCR); the caller decides.
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._scripts = {
            name: self._redis.register_script(source) for name, source in _SCRIPTS.items()
        }
        try:
            await self._redis.set(self._key("partitions"), self.partitions, nx=True)
            recorded = int(await self._redis.get(self._key("partitions")) or self.partitions)
            self.warnings = await self.check_durability(self._durability)
            if recorded != self._configured_partitions:
                self.warnings.append(
                    f"redis_partitions is {self._configured_partitions} but the queue at"
                    f" {self.where} was made with {recorded} partitions, which it keeps"
                )
            if self._owner:  # a tool (check) prints them itself
                for warning in self.warnings:
                    log.warning("%s", warning)
            self.partitions = recorded
            self.depth = int(await self._redis.hget(self._key("counts"), "events") or 0)
            if self._owner:
                await self._tend()
        except (RedisError, OSError) as error:
            await self._disconnect()
            raise QueueRefused(f"queue_url {self.where}: cannot use Redis ({error})") from None
        if self._owner:
            self._tender = asyncio.create_task(self._tend_loop(), name="queue-leases")

    async def check_durability(self, durability: str | None) -> list[str]:
        """Warnings, one line each, where Redis's configuration cannot keep `durability`'s
        promise (or could not be read); none when it can."""
        if durability is None:
            return []
        try:
            config = await self._client().config_get("append*")
        except ResponseError as error:  # CONFIG not allowed (ACL, a managed Redis)
            return [
                f"could not check that Redis at {self.where} keeps acknowledged events"
                f" (CONFIG GET refused: {error}); durability {durability} needs appendonly yes"
                + (" and appendfsync always" if durability == "full" else "")
            ]
        said = {_text(key): _text(value) for key, value in config.items()}
        warnings = []
        if said.get("appendonly") != "yes":
            warnings.append(
                f"Redis at {self.where} has appendonly {said.get('appendonly', '?')}:"
                " acknowledged events can be lost when Redis restarts; set appendonly yes"
            )
        elif durability == "full" and said.get("appendfsync") != "always":
            warnings.append(
                f"Redis at {self.where} has appendfsync {said.get('appendfsync', '?')} but"
                " durability is full: a power loss can lose the events of the last second;"
                " set appendfsync always"
            )
        return warnings

    async def close(self) -> None:
        """Stop renewing, let go of the partitions held (others take them at once), disconnect."""
        self._closing = True
        self._stopping.set()
        if self._tender is not None:
            self._tender.cancel()
            # A cancel that lands in a redis-py command may end it only at its socket timeout
            # (and _stopping ends the loop then): a stop does not wait for that.
            await asyncio.wait({self._tender}, timeout=CLOSE_TIMEOUT)
            self._tender = None
        if self._redis is not None and self._owner:
            # Bounded, as all of a stop: a stalled Redis must not hold the process past its
            # stop's bound. Partitions not released are free anyway once their leases run out.
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self._script(
                        "release", [self._prefix, self.member, *self._pairs(self.held)]
                    )
            self.held.clear()
        await self._disconnect()

    async def _disconnect(self) -> None:
        """Close the connections, waiting at most CLOSE_TIMEOUT for a stalled Redis."""
        redis, self._redis = self._redis, None
        if redis is not None:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await redis.aclose(close_connection_pool=True)

    def _key(self, name: str) -> str:
        return f"{self._prefix}:{name}"

    def _script(self, name: str, args: Sequence[Any]) -> Awaitable[Any]:
        """Run one of the scripts (redis-py loads it again after a Redis restart)."""
        if self._redis is None:
            raise QueueUnavailable("the queue is closed")
        return self._scripts[name](args=list(args))

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise QueueUnavailable("the queue is closed")
        return self._redis

    @staticmethod
    def _pairs(held: dict[int, str]) -> list[str]:
        return [value for n, token in held.items() for value in (str(n), token)]

    async def _call(self, operation: Awaitable[Any], *, stores: bool = False) -> Any:
        """Await a Redis operation: QueueUnavailable when Redis is down, unreachable, too slow
        or refuses (out of memory, read-only); `stores`: success proves puts work again."""
        try:
            result = await operation
        except (RedisError, OSError) as error:
            self._healthy = False
            self.last_error = f"{type(error).__name__}: {error}"
            if isinstance(error, (RedisConnectionError, OSError)):
                await self._drop_idle_connections()
            raise QueueUnavailable(f"Redis at {self.where}: {error}") from None
        if stores:
            self._healthy, self.last_error = True, None
        return result

    async def _drop_idle_connections(self) -> None:
        """Disconnect the pool's idle connections: after a lost connection (Redis restarted,
        a proxy cut it) they are most likely dead too, and with retries off each would fail
        one more command. Commands in flight keep theirs; the next ones connect afresh."""
        if self._redis is None:
            return
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self._redis.connection_pool.disconnect(inuse_connections=False)

    # Leases of partitions

    async def _tend(self) -> int:
        """One heartbeat: renew, notice lost partitions, take free ones up to our share, and
        let go of extras whose claimed events are all settled; returns how many events the
        partitions taken had in flight with their last owner (they go again)."""
        held = dict(self.held)
        share, lost, taken, interrupted = await self._script(
            "tend",
            [
                self._prefix,
                self.member,
                max(1, int(self._lease * 1000)),
                self.partitions,
                "0" if self._closing else "1",
                random.randrange(self.partitions),  # noqa: S311 (not a secret) spreads collectors over the partitions
                *self._pairs(held),
            ],
        )
        self._share = int(share)
        for n in map(int, lost):
            if self.held.get(n) == held.get(n):
                self.held.pop(n, None)
                self._draining.discard(n)
                log.warning("lost the lease of partition %d (another collector has it now)", n)
        for n, token in zip(taken[::2], taken[1::2], strict=True):
            self.held[int(n)] = _text(token)
        self.interrupted += int(interrupted)
        extra = len(self.held) - self._share
        if extra > 0:
            self._draining.update(sorted(set(self.held) - self._draining, reverse=True)[:extra])
        now = time.monotonic()
        pending = {change[1] for changes, _ in self._unsettled for change in changes}
        for event_id, item in list(self._leases.items()):
            if item.until < now and event_id not in pending:
                del self._leases[event_id]  # its lease ran out: the event goes again anyway
        busy = {item.partition for item in self._leases.values()}
        settled = {n: self.held[n] for n in self._draining if n not in busy and n in self.held}
        if self._claiming:
            # A claim sent before these were draining may have leased entries of theirs:
            # they are let go at a turn when no claim is under way.
            settled = {}
        if settled:
            await self._script("release", [self._prefix, "", *self._pairs(settled)])
            for n in settled:
                self.held.pop(n, None)
                self._draining.discard(n)
        return int(interrupted)

    async def _tend_loop(self) -> None:
        # Ends when close() says so, not only by its cancel: redis-py can turn a cancel that
        # lands in a command into an error of its own, which this loop logs and goes on from.
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._lease / 3)
            if self._stopping.is_set():
                return
            try:
                interrupted = await self._tend()
            except (RedisError, OSError) as error:
                self._tend_errors.log(
                    logging.ERROR, "tend", "cannot renew the partition leases: %s", error
                )
                continue
            await self._settle_unsettled()
            if interrupted:
                log.warning(
                    "%s that another collector was sending %s again, with the same X-Outbound-GUID",
                    counted(interrupted, "event"),
                    "goes" if interrupted == 1 else "go",
                )

    async def _settle_unsettled(self) -> None:
        """Store the outcomes that Redis did not take while it was down (fenced as ever: a
        partition lost meanwhile is its new owner's)."""
        pending, self._unsettled = self._unsettled, []
        for changes, now in pending:
            with contextlib.suppress(QueueUnavailable):  # kept for the next turn
                await self._settle_all(changes, now)

    # The queue

    async def put(self, records: Sequence[Record]) -> int:
        kept = records
        if self._dedupe_window > 0:  # a message id twice in one put: keep the first
            kept = list(reversed({dedupe_key(r): r for r in reversed(records)}.values()))
        args: list[Any] = [
            self._prefix,
            math.ceil(self._dedupe_window * 1000),
            self._max_events,
            self._max_bytes,
            repr(self._share_per_ip),
            repr(self._browser_share),
        ]
        for record in kept:
            user = user_key(record)
            args += [
                dedupe_key(record),
                partition_of(user, self.partitions),
                user,
                share_key(record, self._ipv6_prefix) or "",
                repr(float(record["received_at"])),
                orjson.dumps(record),
            ]
        try:
            duplicates, depth, limit = await self._call(self._script("put", args), stores=True)
        except QueueUnavailable as error:
            self._refusals.log(
                logging.ERROR,
                "unavailable",
                "queue refused %s: %s",
                counted(len(records), "event"),
                error,
            )
            raise
        self.depth = int(depth)
        if limit:
            limit = _text(limit)
            full = QueueFull(self._full_message(limit), limit)
            self._refusals.log(
                logging.WARNING, limit, "queue refused %s: %s", counted(len(records), "event"), full
            )
            raise full
        duplicates = int(duplicates) + len(records) - len(kept)
        self.stored += len(records) - duplicates
        self.duplicates += duplicates
        return duplicates

    def _full_message(self, limit: str) -> str:
        """Why a put did not fit, for logs (no client address: it is the client's to know)."""
        if limit == "queue_share_per_ip":
            return "one client holds its share of the queue"
        if limit == "queue_browser_share":
            return "browsers hold their share of the queue; the rest is kept for server tokens"
        return f"the queue is full ({self.depth} events)"

    async def claim(self, limit: int, *, now: float, lease: float, depth: int = 1) -> list[Claimed]:
        held = {n: t for n, t in self.held.items() if n not in self._draining}
        if not held or limit <= 0:
            return []
        args = [
            self._prefix,
            repr(now),
            repr(now + lease),
            limit,
            max(1, depth),
            int(self._lease * 1000 / 3),  # lease left to spare, at least
            *self._pairs(held),
        ]
        self._claiming += 1
        try:
            rows = await self._call(self._script("claim", args))
        finally:
            self._claiming -= 1
        claimed = []
        until = time.monotonic() + lease
        for n, stream_id, user, attempts, received_at, body, identified in rows:
            event_id = next(self._ids)
            partition = int(n)
            self._leases[event_id] = _Lease(
                partition, held[partition], _text(stream_id), _text(user), until
            )
            record = orjson.loads(body)
            claimed.append(
                Claimed(event_id, record, int(attempts), float(received_at), bool(identified))
            )
        return claimed

    async def _settle_all(self, changes: list[Change], now: float | None = None) -> None:
        """Apply (kind, event id, three arguments) changes in one script; forget their leases.
        `now`: a dead letter's failed_at, which also times the retention."""
        leases = []
        args: list[Any] = []
        for kind, event_id, a, b, c in changes:
            item = self._leases.get(event_id)
            if item is None:
                continue  # not ours (settled already, or claimed by an earlier process)
            leases.append((event_id, item))
            args += [kind, item.partition, item.token, item.stream_id, item.user, a, b, c]
        if not leases:
            return
        cutoff = self._retention_cutoff(time.time() if now is None else now)
        args = [self._prefix, cutoff, self._dead_letters_max, repr(now or 0.0), *args]
        try:
            answer = await self._call(self._script("settle", args))
        except QueueUnavailable:
            self._unsettled.append((changes, now))
            raise
        depth, expired, over, *results = (int(value) for value in answer)
        self.depth = depth
        for (event_id, item), result in zip(leases, results, strict=True):
            self._leases.pop(event_id, None)
            if result == 0:
                self.fenced += 1
                if (item.partition, item.token) not in self._fenced_logged:
                    self._fenced_logged.add((item.partition, item.token))
                    log.warning(
                        "partition %d was taken over before its events' outcomes were stored;"
                        " its new owner sends them again with the same X-Outbound-GUID",
                        item.partition,
                    )
        self._drops.dropped(expired, over)

    def _retention_cutoff(self, now: float) -> str:
        """The failed_at before which dead letters go, at most once a RETENTION_INTERVAL."""
        if not self._dead_letter_days or now - self._retained_at < RETENTION_INTERVAL:
            return ""
        self._retained_at = now
        return repr(now - self._dead_letter_days * 86400)

    @property
    def dead_letters_dropped(self) -> int:
        """Dead letters retention dropped since open."""
        return self._drops.count

    async def ack(self, event_id: int, *, identified: bool = False) -> None:
        await self._settle_all([("ack", event_id, "1" if identified else "0", "", "")])

    async def ack_all(self, acked: Sequence[tuple[int, bool]]) -> None:
        await self._settle_all(
            [
                ("ack", event_id, "1" if identified else "0", "", "")
                for event_id, identified in acked
            ]
        )

    async def retry(self, event_id: int, *, available_at: float, error: str) -> None:
        await self._settle_all([("retry", event_id, repr(available_at), error, "")])

    async def release(self, event_id: int) -> None:
        await self._settle_all([("release", event_id, "", "", "")])

    async def dead_letter(
        self, event_id: int, *, reason: str, status: int | None, response: str, now: float
    ) -> None:
        status_text = "" if status is None else str(status)
        await self._settle_all([("dead", event_id, reason, status_text, response)], now=now)

    async def reset_backoff(self, now: float) -> None:
        await self._call(self._script("reset_backoff", [self._prefix, repr(now)]))

    async def stats(self) -> QueueStats:
        client = self._client()
        if self._owner and (cutoff := self._retention_cutoff(time.time())):
            answer = await self._call(
                self._script("settle", [self._prefix, cutoff, self._dead_letters_max, cutoff])
            )
            self._drops.dropped(int(answer[1]), int(answer[2]))
        pipe = client.pipeline(transaction=False)
        pipe.hget(self._key("counts"), "events")
        pipe.zcard(self._key("dl:ids"))
        for n in range(self.partitions):
            pipe.xrange(self._key(f"p:{n}"), count=1)
        depth, dead, *firsts = await self._call(pipe.execute())
        self.depth = int(depth or 0)
        oldest = [float(entry[0][1][b"r"]) for entry in firsts if entry]
        return QueueStats(self.depth, min(oldest) if oldest else None, int(dead))

    async def probe(self, now: float) -> bool:
        """Try a real write of PROBE_BYTES (then delete it); True when Redis stores again."""
        pipe = self._client().pipeline(transaction=True)
        pipe.set(self._key("probe"), os.urandom(PROBE_BYTES))
        pipe.delete(self._key("probe"))
        with contextlib.suppress(QueueUnavailable):
            await self._call(pipe.execute(), stores=True)
        return self._healthy

    async def shared_secret(self, name: str) -> str:
        """A random key (64 hex digits) that every collector on this queue shares, made by
        the first that asks: the ids a collector derives must be the same in all of them."""
        client, key = self._client(), self._key(f"secret:{name}")
        await self._call(client.set(key, secrets.token_hex(32), nx=True))
        return _text(await self._call(client.get(key)))

    async def note(self, key: str, value: object) -> None:
        await self._call(self._client().hset(self._key("notes"), key, orjson.dumps(value)))

    async def notes(self) -> dict[str, Any]:
        raw = await self._call(self._client().hgetall(self._key("notes")))
        return {_text(key): orjson.loads(value) for key, value in raw.items()}

    # Dead letters

    async def _letters(self, fields: Sequence[str]) -> list[tuple[int, list[Any]]]:
        """Every dead letter's id and `fields`, oldest first, a page a round trip."""
        client = self._client()
        ids = [int(i) for i in await self._call(client.zrange(self._key("dl:ids"), 0, -1))]
        found: list[tuple[int, list[Any]]] = []
        for start in range(0, len(ids), LETTER_PAGE):
            page = ids[start : start + LETTER_PAGE]
            pipe = client.pipeline(transaction=False)
            for letter in page:
                pipe.hmget(self._key(f"dl:{letter}"), list(fields))
            for letter, values in zip(page, await self._call(pipe.execute()), strict=True):
                if values[0] is not None:
                    found.append((letter, values))
        return found

    @staticmethod
    def _matches(which: DeadLetterFilter, letter: int, reason: str, status: str, body: Any) -> bool:
        if which.ids and letter not in which.ids:
            return False
        if which.reason is not None and which.reason not in reason:
            return False
        if which.status is not None and status != str(which.status):
            return False
        return which.event is None or body.get("event") == which.event

    async def _matching(self, which: DeadLetterFilter) -> list[tuple[int, str]]:
        """The ids (and users) of the dead letters `which` names, oldest first."""
        chosen = []
        for letter, (body, user, reason, status) in await self._letters(
            ("b", "u", "why", "status")
        ):
            if self._matches(which, letter, _text(reason), _text(status), orjson.loads(body)):
                chosen.append((letter, _text(user)))
        return chosen

    async def dead_letters(
        self, which: DeadLetterFilter | None = None, *, limit: int = -1
    ) -> list[dict[str, Any]]:
        """Dead letters (all or those matching), oldest first, with reason and Outbound's answer."""
        which = which or DeadLetterFilter()
        letters = []
        for letter, (body, reason, status, response, attempts, failed_at) in await self._letters(
            ("b", "why", "status", "response", "a", "f")
        ):
            record = orjson.loads(body)
            status_text = _text(status)
            if not self._matches(which, letter, _text(reason), status_text, record):
                continue
            letters.append(
                {
                    "id": letter,
                    "message_id": record.get("message_id"),
                    "reason": _text(reason),
                    "status": int(status_text) if status_text else None,
                    "response": _text(response),
                    "attempts": int(attempts),
                    "failed_at": float(failed_at),
                    "record": record,
                }
            )
            if 0 <= limit <= len(letters):
                break
        return letters

    async def dead_letter_reasons(self) -> list[tuple[str, int]]:
        """How many dead letters there are for each reason, most first."""
        counts: dict[str, int] = {}
        for _, (reason,) in await self._letters(("why",)):
            counts[_text(reason)] = counts.get(_text(reason), 0) + 1
        return sorted(counts.items(), key=lambda item: (-item[1], item[0]))

    async def replay_dead_letters(
        self, which: DeadLetterFilter, *, chunk: int = 1000, progress: Progress | None = None
    ) -> int:
        """Put matching dead letters back in their users' lines, in order, with their ids."""
        chosen = await self._matching(which)
        done = 0
        for start in range(0, len(chosen), chunk):
            args: list[Any] = [self._prefix]
            for letter, user in chosen[start : start + chunk]:
                args += [letter, partition_of(user, self.partitions)]
            done += int(await self._call(self._script("replay", args)))
            if progress is not None:
                progress(done)
        return done

    async def purge_dead_letters(
        self, which: DeadLetterFilter, *, chunk: int = 1000, progress: Progress | None = None
    ) -> int:
        """Delete matching dead letters for good."""
        chosen = [letter for letter, _ in await self._matching(which)]
        done = 0
        for start in range(0, len(chosen), chunk):
            done += int(
                await self._call(
                    self._script("purge", [self._prefix, *chosen[start : start + chunk]])
                )
            )
            if progress is not None:
                progress(done)
        return done
