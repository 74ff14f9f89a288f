-- Seed a budget's spend from the ledger, once per state.
-- KEYS[1]: the budget's state. ARGV: the ledger's spend (1e-9 units), seconds the state may be kept (0: ever).
-- Settlements that came before the seed (after a flush) are in the ledger too, or about to be:
-- the larger of the two is kept, never their sum.
if redis.call('HEXISTS', KEYS[1], 'seeded') == 1 then
  return 0
end
local s = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
redis.call('HSET', KEYS[1], 'spent', string.format('%.0f', math.max(s, tonumber(ARGV[1]))), 'seeded', '1')
if tonumber(ARGV[2]) > 0 then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 1
