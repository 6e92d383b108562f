"""The Redis claim script: one round trip pops up to the free credit of waiting messages
(interactive lane first) and writes kombu's unacked entries for them in the same call."""

from __future__ import annotations

# The header a producer sets to a job's input count: a claim weighs each message by it.
INPUTS_HEADER = "pipeq_inputs"

# Messages one claim may pop: small enough that the fronts of a host, each BRPOP-ing in turn, share
# a short queue instead of the first one taking its whole credit.
CLAIM_LIMIT = 32


# KEYS[1] unacked hash, KEYS[2] unacked index, KEYS[3..] queue lists in claim order.
# ARGV[1] credit: inputs the consumer may still take (a message weighs its INPUTS_HEADER, else 1);
# ARGV[2] now; ARGV[3] most messages to take. Returns {list key, payload, ...}.
# A message heavier than the credit left stays where it was (pushed back to the tail it was popped
# from), so a front whose credit is nearly spent does not take a 64-input job that others have
# room for. A payload that is not kombu's JSON envelope is returned without an unacked entry (the
# consumer rejects it), so one malformed message cannot abort a claim half-written.
CLAIM = (
    """
local credit, most = tonumber(ARGV[1]), tonumber(ARGV[3])
local out = {}
for i = 3, #KEYS do
  while credit > 0 and most > 0 do
    local raw = redis.call('RPOP', KEYS[i])
    if not raw then break end
    local ok, msg = pcall(cjson.decode, raw)
    local weight = 1
    local headers = ok and type(msg) == 'table' and msg['headers']
    if type(headers) == 'table' and tonumber(headers['"""
    + INPUTS_HEADER
    + """']) then
      weight = math.max(1, tonumber(headers['"""
    + INPUTS_HEADER
    + """']))
    end
    if weight > credit then
      redis.call('RPUSH', KEYS[i], raw)
      credit = 0
      break
    end
    local props = ok and type(msg) == 'table' and msg['properties']
    if type(props) == 'table' and type(props['delivery_tag']) == 'string' then
      local info = props['delivery_info']
      if type(info) ~= 'table' then info = {} end
      local tag = props['delivery_tag']
      redis.call('HSET', KEYS[1], tag, '[' .. raw .. ',' .. cjson.encode(info['exchange'] or '')
        .. ',' .. cjson.encode(info['routing_key'] or '') .. ']')
      redis.call('ZADD', KEYS[2], ARGV[2], tag)
    end
    out[#out + 1] = KEYS[i]
    out[#out + 1] = raw
    credit = credit - weight
    most = most - 1
  end
end
return out
"""
)
