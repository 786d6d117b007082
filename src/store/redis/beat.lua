-- The health monitor's heartbeat (`Keys::beat`), raised at every look so that a Redis restarted
-- from its append-only file shows whether its data holds the last look's. A value that is not a
-- counter of ours (another type, not a number, out of range: someone else's) starts again from 0.
-- Returns the new value.
local v = redis.pcall('GET', KEYS[1])
local n = 0
if type(v) == 'string' then n = tonumber(v) or 0 end
if n ~= n or n < 0 or n >= 2^52 then n = 0 end
n = math.floor(n) + 1
redis.call('SET', KEYS[1], string.format('%d', n))
return n
