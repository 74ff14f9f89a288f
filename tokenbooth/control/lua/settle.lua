-- Replace one call's reservations by what it really used, once.
-- KEYS as in admit.lua. ARGV[1..3]: call id, now (unix seconds), marker ttl (seconds).
-- Then five values per check: kind, limit, reserved amount, actual amount, refill per second.
-- A call settled before (the marker says 's') changes nothing: settlements may be replayed.
local id = ARGV[1]
local now = tonumber(ARGV[2])
local n = (#ARGV - 3) / 5
local function fmt(x) return string.format('%.0f', x) end

-- one command both marks the call settled and says whether it was already (SET ... GET: Redis 6.2+)
if redis.call('SET', KEYS[1], 's', 'EX', tonumber(ARGV[3]), 'GET') == 's' then
  return 0
end
for i = 1, n do
  local a = 3 + (i - 1) * 5
  local kind, limit, reserved, actual, param = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]),
    tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local key, aux = KEYS[2 * i], KEYS[2 * i + 1]
  if kind == 'b' then
    local v = redis.call('HMGET', key, 'spent', 'reserved', 'r:' .. id)
    local s, r = tonumber(v[1] or '0'), tonumber(v[2] or '0')
    if v[3] then
      r = r - tonumber(v[3])
      redis.call('HDEL', key, 'r:' .. id)
      redis.call('ZREM', aux, id)
    end
    -- on a state that a flush removed, this writes no 'seeded': the next admission seeds it
    -- with the larger of the ledger's sum and this, so nothing is counted twice
    redis.call('HSET', key, 'spent', fmt(s + actual), 'reserved', fmt(r))
  elseif kind == 'r' then
    if reserved ~= actual then
      local v = redis.call('HMGET', key, 't', 'at')
      local t, at = tonumber(v[1] or limit), tonumber(v[2] or now)
      t = math.min(limit, t + math.max(now - at, 0) * param + reserved - actual)
      redis.call('HSET', key, 't', string.format('%.3f', t), 'at', string.format('%.3f', math.max(now, at)))
    end
  else
    redis.call('ZREM', key, id)
  end
end
return 1
