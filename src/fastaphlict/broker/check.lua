-- The permission check: every command the publish script runs, each in a
-- pcall on scratch keys, so a Redis user whose ACL lacks one is told by name
-- when the command connection is made, not by the first post failing. Redis
-- 7 checks the commands a script runs against the caller's ACL, and its
-- error inside a script does not say which command it was.
-- KEYS: 1 a scratch stream, 2 a scratch sorted set, 3 a scratch mark.
-- ARGV: 1 a scratch channel. Returns {command, error} pairs for each refusal.
-- The scratch keys are shared by every node and kept small and short-lived.
-- Until the check passes nothing is published: the script would stop half-way.
local refused = {}
local function try(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err then
    refused[#refused + 1] = {string.lower((...)), reply.err}
  end
end
try('EXISTS', KEYS[3])
try('XADD', KEYS[1], 'MAXLEN', '~', '1', '*', 'check', '1')
try('SET', KEYS[3], '1', 'PX', '1000')
try('TIME')
try('XTRIM', KEYS[1], 'MINID', '0')
try('PEXPIRE', KEYS[1], '1000')
try('ZADD', KEYS[2], '0', 'check')
try('ZREMRANGEBYSCORE', KEYS[2], '-inf', '-1')
try('PEXPIRE', KEYS[2], '1000')
try('PUBLISH', ARGV[1], 'C')
return refused
