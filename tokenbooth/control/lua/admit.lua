-- Admit one call against every check that applies to it, or refuse it and change nothing.
-- KEYS[1]: the call's marker. Then two keys per check: its state, and (budgets) its lease set.
-- ARGV[1..4]: call id, now (unix seconds), lease expiry (unix seconds), marker ttl (seconds).
-- Then five values per check: kind (b budget, r token bucket, c concurrency), limit, amount,
-- hard (budgets: 1 or 0) or refill per second (buckets), and seconds the state may be kept (0: ever).
-- Expiries are relative, so a caller's clock and Redis's need not agree.
-- Amounts are integers (budgets in 1e-9 units) written with %.0f: Lua numbers are doubles.
local id = ARGV[1]
local now = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
local n = (#ARGV - 4) / 5
local function fmt(x) return string.format('%.0f', x) end
local function num(x) return string.format('%.3f', x) end

-- the marker is set first (one command on the path every call takes) and removed again if the
-- call is not admitted
if not redis.call('SET', KEYS[1], 'a', 'NX', 'EX', tonumber(ARGV[4])) then
  return {'dup'}
end

local need, used, spent, at, reserved = {}, {}, {}, {}, {}
local refused = 0
for i = 1, n do
  local a = 4 + (i - 1) * 5
  local kind, limit, amount, param = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local key, aux = KEYS[2 * i], KEYS[2 * i + 1]
  if kind == 'b' then
    -- reservations whose lease ended (their replica died before settling) stop counting
    local gone = redis.call('ZRANGEBYSCORE', aux, '-inf', now, 'LIMIT', 0, 100)
    for _, call in ipairs(gone) do
      local held = tonumber(redis.call('HGET', key, 'r:' .. call))
      if held then
        redis.call('HDEL', key, 'r:' .. call)
        redis.call('HSET', key, 'reserved', fmt(tonumber(redis.call('HGET', key, 'reserved') or '0') - held))
      end
      redis.call('ZREM', aux, call)
    end
    local v = redis.call('HMGET', key, 'spent', 'reserved', 'seeded')
    local s, r = tonumber(v[1] or '0'), tonumber(v[2] or '0')
    if not v[3] then need[#need + 1] = i end
    reserved[i] = r
    if param == 1 and refused == 0 and s + r + amount > limit then refused = i end
    used[i] = fmt(s + r)
    spent[i] = fmt(s)
  elseif kind == 'r' then
    local v = redis.call('HMGET', key, 't', 'at')
    local t = tonumber(v[1] or limit)
    at[i] = tonumber(v[2] or now)
    t = math.min(limit, t + math.max(now - at[i], 0) * param)
    if refused == 0 and t < amount then refused = i end
    used[i] = num(t)
    spent[i] = '0'
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local c = redis.call('ZCARD', key)
    if refused == 0 and c >= limit then refused = i end
    used[i] = fmt(c)
    spent[i] = '0'
  end
end
if #need > 0 then
  redis.call('DEL', KEYS[1])
  return {'seed', need}
end
if refused > 0 then
  redis.call('DEL', KEYS[1])
  return {'refused', refused, used, spent}
end

for i = 1, n do
  local a = 4 + (i - 1) * 5
  local kind, limit, amount, param, expire = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]),
    tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local key, aux = KEYS[2 * i], KEYS[2 * i + 1]
  if kind == 'b' then
    local r = reserved[i] + amount
    redis.call('HSET', key, 'reserved', fmt(r), 'r:' .. id, fmt(amount))
    -- the state's own expiry was set when it was seeded; the lease set gets one when it is made
    if redis.call('ZADD', aux, lease, id) == 1 and expire > 0 and redis.call('TTL', aux) < 0 then
      redis.call('EXPIRE', aux, expire)
    end
    used[i] = fmt(tonumber(used[i]) + amount)
  elseif kind == 'r' then
    local t = tonumber(used[i]) - amount
    redis.call('HSET', key, 't', num(t), 'at', num(math.max(now, at[i])))
    redis.call('EXPIRE', key, math.ceil((limit - t) / param) + 60)
    used[i] = num(t)
  else
    redis.call('ZADD', key, lease, id)
    redis.call('EXPIRE', key, math.ceil(lease - now) + 60)
    used[i] = fmt(tonumber(used[i]) + 1)
  end
end
return {'ok', 0, used, spent}
