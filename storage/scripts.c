/* Lua sources. Conventions: KEYS[1] is the user's key prefix "rd:{bare-jid}" (the hash tag puts
 * all of one user's keys in one cluster slot); global keys come after it. Times are epoch ms.
 * A message id S is "<seq>-<suffix>", seq being the user's arrival counter and the offline
 * queue's score, so S keeps its place after it was removed. */
#include "scripts.h"

/* Shared by the scripts that need them: who is online for the current link epoch, and moving a
 * pending message to the offline queue. The epoch is read here, not passed in, so that every
 * receiptd instance sharing this Redis agrees on it: any instance's re-attach makes all earlier
 * presence unverified for all of them. */
#define LUA_HELPERS                                                                                \
    "local function epoch() return redis.call('GET', 'rd:epoch') or '0' end\n"                     \
    "local function online(P)\n"                                                                   \
    "  local res, rs, epoch = {}, redis.call('HGETALL', P .. ':r'), epoch()\n"                     \
    "  for i = 1, #rs, 2 do if rs[i + 1] == epoch then res[#res + 1] = rs[i] end end\n"            \
    "  return res\n"                                                                               \
    "end\n"                                                                                        \
    "local function to_offline(P, sid, blob)\n"                                                    \
    "  redis.call('ZREM', P .. ':p', sid)\n"                                                       \
    "  redis.call('HDEL', P .. ':pw', sid)\n"                                                      \
    "  local seq = tonumber(string.match(sid, '^(%d+)'))\n"                                        \
    "  if redis.call('ZADD', P .. ':q', seq, sid) == 1 then\n"                                     \
    "    redis.call('INCRBY', P .. ':qb', #blob)\n"                                                \
    "  end\n"                                                                                      \
    "end\n"

/* KEYS: P, rd:due. ARGV: user, sender, orig id ('' = none), suffix, blob, track (1 = receipt
 * requested: dedupe and keep pending), now, retry_ms, window_ms, dedupe_s, max_n, max_b.
 * Returns {'dup', S} | {'full'} | {'live', S or '', resource...} | {'offline', S}. */
static const char put_lua[] =
    LUA_HELPERS
    "local P, user, sender, oid, blob = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[5]\n"
    "local track, now = ARGV[6] == '1', tonumber(ARGV[7])\n"
    "local okey = nil\n"
    "if track and oid ~= '' then\n"
    "  okey = sender .. ' ' .. oid\n"
    "  local prev = redis.call('GET', P .. ':dd:' .. okey)\n"
    "  if prev then return {'dup', prev} end\n"
    "end\n"
    "local res = online(P)\n"
    "if #res > 0 and not track then return {'live', '', unpack(res)} end\n"
    "local n = redis.call('ZCARD', P .. ':q') + redis.call('ZCARD', P .. ':p')\n"
    "local b = tonumber(redis.call('GET', P .. ':qb') or '0')\n"
    "if n >= tonumber(ARGV[11]) or b + #blob > tonumber(ARGV[12]) then return {'full'} end\n"
    "local seq = redis.call('INCR', P .. ':seq')\n"
    "local sid = seq .. '-' .. ARGV[4]\n"
    "redis.call('HSET', P .. ':m', sid, blob)\n"
    "if okey then\n"
    "  redis.call('SET', P .. ':dd:' .. okey, sid, 'EX', ARGV[10])\n"
    "  redis.call('HSET', P .. ':o', okey, sid)\n"
    "  redis.call('HSET', P .. ':k', sid, okey)\n"
    "end\n"
    "if #res > 0 then\n"
    "  local due = now + tonumber(ARGV[8])\n"
    "  redis.call('ZADD', P .. ':p', due, sid)\n"
    "  redis.call('HSET', P .. ':pw', sid, now + tonumber(ARGV[9]))\n"
    "  local cur = redis.call('ZSCORE', KEYS[2], user)\n"
    "  if not cur or tonumber(cur) > due then redis.call('ZADD', KEYS[2], due, user) end\n"
    "  return {'live', sid, unpack(res)}\n"
    "end\n"
    "redis.call('ZADD', P .. ':q', seq, sid)\n"
    "redis.call('INCRBY', P .. ':qb', #blob)\n"
    "return {'offline', sid}\n";

/* KEYS: P. ARGV: 'sid', S... | 'orig', "sender origid". Removes each message wherever it is
 * (pending or offline) and returns {S, blob, ...} for those that existed. */
static const char ack_lua[] =
    "local P, out = KEYS[1], {}\n"
    "local function drop(sid)\n"
    "  local blob = redis.call('HGET', P .. ':m', sid)\n"
    "  if not blob then return end\n"
    "  redis.call('HDEL', P .. ':m', sid)\n"
    "  redis.call('HDEL', P .. ':pw', sid)\n"
    "  redis.call('ZREM', P .. ':p', sid)\n"
    "  if redis.call('ZREM', P .. ':q', sid) == 1 then redis.call('DECRBY', P .. ':qb', #blob) end\n"
    "  local okey = redis.call('HGET', P .. ':k', sid)\n"
    "  if okey then\n"
    "    redis.call('HDEL', P .. ':o', okey)\n"
    "    redis.call('HDEL', P .. ':k', sid)\n"
    "  end\n"
    "  out[#out + 1] = sid\n"
    "  out[#out + 1] = blob\n"
    "end\n"
    "if ARGV[1] == 'orig' then\n"
    "  local sid = redis.call('HGET', P .. ':o', ARGV[2])\n"
    "  if sid then drop(sid) end\n"
    "else\n"
    "  for i = 2, #ARGV do drop(ARGV[i]) end\n"
    "end\n"
    "return out\n";

/* KEYS: P, rd:online. ARGV: user, "sender origid", resource. The resource is gone; when
 * the user has no other online resource, the bounced message goes to the offline queue now.
 * Returns the moved S or false. */
static const char bounce_lua[] =
    LUA_HELPERS
    "local P = KEYS[1]\n"
    "redis.call('HDEL', P .. ':r', ARGV[3])\n"
    "if redis.call('HLEN', P .. ':r') == 0 then redis.call('SREM', KEYS[2], ARGV[1]) end\n"
    "local sid = redis.call('HGET', P .. ':o', ARGV[2])\n"
    "if not sid or not redis.call('ZSCORE', P .. ':p', sid) then return false end\n"
    "if #online(P) > 0 then return false end\n"
    "local blob = redis.call('HGET', P .. ':m', sid)\n"
    "if not blob then return false end\n"
    "to_offline(P, sid, blob)\n"
    "return sid\n";

/* KEYS: rd:due. ARGV: now, retry_ms, max users. For each user whose earliest pending
 * message is due: past its delivery window or with nobody online it moves to the offline queue,
 * otherwise it is rescheduled and returned for retransmission. Returns
 * {user, {resource...}, {S, blob, ...}, ...} for users with something to resend. */
static const char due_lua[] =
    LUA_HELPERS
    "local now, retry = tonumber(ARGV[1]), tonumber(ARGV[2])\n"
    "local users = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[3])\n"
    "local out = {}\n"
    "for _, u in ipairs(users) do\n"
    "  local P = 'rd:{' .. u .. '}'\n"
    "  local res = online(P)\n"
    "  local resend = {}\n"
    "  for _, sid in ipairs(redis.call('ZRANGEBYSCORE', P .. ':p', '-inf', now)) do\n"
    "    local blob = redis.call('HGET', P .. ':m', sid)\n"
    "    local deadline = tonumber(redis.call('HGET', P .. ':pw', sid) or '0')\n"
    "    if not blob then\n"
    "      redis.call('ZREM', P .. ':p', sid)\n"
    "      redis.call('HDEL', P .. ':pw', sid)\n"
    "    elseif #res == 0 or deadline <= now then\n"
    "      to_offline(P, sid, blob)\n"
    "    else\n"
    "      redis.call('ZADD', P .. ':p', now + retry, sid)\n"
    "      resend[#resend + 1] = sid\n"
    "      resend[#resend + 1] = blob\n"
    "    end\n"
    "  end\n"
    "  local nxt = redis.call('ZRANGE', P .. ':p', 0, 0, 'WITHSCORES')\n"
    "  if #nxt == 0 then redis.call('ZREM', KEYS[1], u) else redis.call('ZADD', KEYS[1], nxt[2], u) end\n"
    "  if #resend > 0 then\n"
    "    out[#out + 1] = u\n"
    "    out[#out + 1] = res\n"
    "    out[#out + 1] = resend\n"
    "  end\n"
    "end\n"
    "return out\n";

/* KEYS: P, rd:online, rd:due. ARGV: 'set' | 'del' | 'verify', user, resource, now.
 * 'verify' marks a resource online again only if it is still registered (it answered our ping
 * after a reconnect, and no unavailable came in between). When the last resource leaves, the
 * user's pending messages fall due now, so they reach the offline queue without waiting out a
 * retry interval. */
static const char presence_lua[] =
    LUA_HELPERS
    "local P, op, user, res = KEYS[1], ARGV[1], ARGV[2], ARGV[3]\n"
    "if op == 'set' then\n"
    "  redis.call('HSET', P .. ':r', res, epoch())\n"
    "  redis.call('SADD', KEYS[2], user)\n"
    "elseif op == 'verify' then\n"
    "  if redis.call('HEXISTS', P .. ':r', res) == 1 then redis.call('HSET', P .. ':r', res, epoch()) end\n"
    "else\n"
    "  redis.call('HDEL', P .. ':r', res)\n"
    "  if redis.call('HLEN', P .. ':r') == 0 then\n"
    "    redis.call('SREM', KEYS[2], user)\n"
    "    if redis.call('ZCARD', P .. ':p') > 0 then redis.call('ZADD', KEYS[3], ARGV[4], user) end\n"
    "  end\n"
    "end\n"
    "return 1\n";

/* KEYS: rd:online. ARGV: max. Returns {user, resource, ...} registered under an older
 * link epoch: the resources to ping after a reconnect. */
static const char stale_lua[] =
    LUA_HELPERS
    "local out, cur = {}, epoch()\n"
    "for _, u in ipairs(redis.call('SMEMBERS', KEYS[1])) do\n"
    "  local rs = redis.call('HGETALL', 'rd:{' .. u .. '}:r')\n"
    "  for i = 1, #rs, 2 do\n"
    "    if rs[i + 1] ~= cur and #out < 2 * tonumber(ARGV[1]) then\n"
    "      out[#out + 1] = u\n"
    "      out[#out + 1] = rs[i]\n"
    "    end\n"
    "  end\n"
    "end\n"
    "return out\n";

/* KEYS: P. ARGV: max items. Returns {count, bytes, oldest blob, newest blob, S, blob, ...}
 * with the blobs '' when the queue is empty and up to max (S, blob) pairs, oldest first. */
static const char summary_lua[] =
    "local P, max = KEYS[1], tonumber(ARGV[1])\n"
    "local q = P .. ':q'\n"
    "local out = {redis.call('ZCARD', q), tonumber(redis.call('GET', P .. ':qb') or '0')}\n"
    "local ends = {redis.call('ZRANGE', q, 0, 0)[1], redis.call('ZRANGE', q, -1, -1)[1]}\n"
    "for i = 1, 2 do\n"
    "  out[#out + 1] = ends[i] and redis.call('HGET', P .. ':m', ends[i]) or ''\n"
    "end\n"
    "if max > 0 then\n"
    "  for _, sid in ipairs(redis.call('ZRANGE', q, 0, max - 1)) do\n"
    "    out[#out + 1] = sid\n"
    "    out[#out + 1] = redis.call('HGET', P .. ':m', sid) or ''\n"
    "  end\n"
    "end\n"
    "return out\n";

/* KEYS: P. ARGV: after seq, max, max bytes, per-message overhead. Oldest first after the cursor;
 * always at least one message, so a single large one cannot stall the reader. Returns
 * {complete (0|1), S, blob, ...}. */
static const char fetch_lua[] =
    "local P, max, budget, over = KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])\n"
    "local sids = redis.call('ZRANGEBYSCORE', P .. ':q', '(' .. ARGV[1], '+inf', 'LIMIT', 0, max + 1)\n"
    "local out, used, taken = {0}, 0, 0\n"
    "for _, sid in ipairs(sids) do\n"
    "  if taken == max then break end\n"
    "  local blob = redis.call('HGET', P .. ':m', sid) or ''\n"
    "  if taken > 0 and used + #blob + over > budget then break end\n"
    "  used = used + #blob + over\n"
    "  taken = taken + 1\n"
    "  out[#out + 1] = sid\n"
    "  out[#out + 1] = blob\n"
    "end\n"
    "if taken == #sids then out[1] = 1 end\n"
    "return out\n";

const char *store_script_source(store_script_t s)
{
    static const char *const sources[STORE_SCRIPT_COUNT] = {
        [STORE_SCRIPT_PUT] = put_lua,         [STORE_SCRIPT_ACK] = ack_lua,
        [STORE_SCRIPT_BOUNCE] = bounce_lua,   [STORE_SCRIPT_DUE] = due_lua,
        [STORE_SCRIPT_PRESENCE] = presence_lua, [STORE_SCRIPT_STALE] = stale_lua,
        [STORE_SCRIPT_SUMMARY] = summary_lua, [STORE_SCRIPT_FETCH] = fetch_lua,
    };
    return sources[s];
}
