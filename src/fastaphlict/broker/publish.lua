-- Writes one message to its instance's stream and publishes it on the
-- cluster's channel, atomically: a node never sees a message the history
-- lacks or the reverse.
-- KEYS: 1 the instance's stream, 2 the instance set, 3 this message's mark
--       (fastaphlict:seq:<origin>:<sequence>).
-- ARGV: 1 instance, 2 origin, 3 sequence, 4 accepted at (ms), 5 payload,
--       6 history limit, 7 history window (ms), 8 channel, 9 "1" to maintain,
--       10 how long the mark is kept (ms).
-- Returns the new entry's id, or false when the mark is there: this message
-- was published already (a retry after a lost reply). The mark is set after
-- the XADD, so a message whose XADD failed (OOM, say) is not marked and its
-- retry goes through. The count trim is approximate (whole radix nodes,
-- cheap) and on every message; the age trim, the expiries and the instance
-- set are kept up to date when the node asks ("maintain": at most once a
-- second per instance), which keeps the script at a few microseconds.
-- The channel's format is read by fastaphlict/broker/wire.py.
if redis.call('EXISTS', KEYS[3]) == 1 then return false end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[6], '*',
  'o', ARGV[2], 's', ARGV[3], 'a', ARGV[4], 'p', ARGV[5])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[10])
if ARGV[9] == '1' then
  local window = tonumber(ARGV[7])
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('XTRIM', KEYS[1], 'MINID', tostring(now - window))
  redis.call('PEXPIRE', KEYS[1], 2 * window)
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 2 * window)
  redis.call('PEXPIRE', KEYS[2], 2 * window)
end
redis.call('PUBLISH', ARGV[8], 'M\n' .. ARGV[2] .. '\n' .. ARGV[3] .. '\n' .. id .. '\n'
  .. ARGV[4] .. '\n' .. #ARGV[1] .. '\n' .. ARGV[1] .. ARGV[5])
return id
