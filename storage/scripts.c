/* Lua sources. Conventions: KEYS[1] is the user's key prefix "rd:{bare-jid}" (the hash tag puts
 * all of one user's keys in one cluster slot); global keys come after it. Times are epoch ms.
 * A message id S is "<seq>-<suffix>", seq being the user's arrival counter and the offline
 * queues' score, so S keeps its place after it was removed.
 *
 * Per-device model (proto/PROTOCOL.md): P:q holds every stored message until every known device
 * (one that ever acked, or one online now) acked it; P:ak lists, per message, the devices that
 * did. A device sees what it has not acked. Online resources also get pushes ("S resource" in
 * P:p) until they ack or the delivery window ends. */
#include "scripts.h"

/* Every script gets the caller's link epoch and dedupe window (ms) as ARGV[1] and ARGV[2]
 * (storage/store.c adds them) and sees the rest of its arguments as ARGV[1..]: no script reads a
 * key it was not given, which Redis Cluster requires. */
#define LUA_PROLOGUE                                                                               \
    "local EPOCH, DEDUPE_MS = ARGV[1], tonumber(ARGV[2])\n"                                        \
    "local ARGV = {select(3, unpack(ARGV))}\n"

/* Who is online for the caller's link epoch (storage/SCHEMA.md). Each script defines only the
 * helpers it calls: Lua builds every one of them again at each call, which the put, run once per
 * message, would pay for nothing. num() is tonumber() remembered for the call: Lua parses a
 * number with strtod, about 2 000 instructions, and the puts of a put_many call share their
 * clock, limits and epochs, so each was parsed again for every put (a sixth of a put's Lua). */
#define LUA_ONLINE                                                                                 \
    "local EPOCH_N = tonumber(EPOCH)\n"                                                            \
    "local nums = {}\n"                                                                            \
    "local function num(v)\n"                                                                      \
    "  local n = nums[v]\n"                                                                        \
    "  if n == nil and v ~= nil then n = tonumber(v); nums[v] = n end\n"                           \
    "  return n\n"                                                                                 \
    "end\n"                                                                                        \
    "local function epoch() return EPOCH end\n"                                                    \
    "local function register(P, res)\n"                                                            \
    "  local cur = tonumber(redis.call('HGET', P .. ':r', res) or '0')\n"                          \
    "  if EPOCH_N > cur then redis.call('HSET', P .. ':r', res, epoch()) end\n"                    \
    "end\n"                                                                                        \
    "local function online(P)\n"                                                                   \
    "  local res, rs, cur = {}, redis.call('HGETALL', P .. ':r'), EPOCH_N\n"                       \
    "  if cur == 0 then return res end\n"                                                          \
    "  for i = 1, #rs, 2 do if num(rs[i + 1]) >= cur then res[#res + 1] = rs[i] end end\n"         \
    "  return res\n"                                                                               \
    "end\n"

/* Dedupe (storage/SCHEMA.md): the origin ("<sender bare> <original id>") of every
 * receipt-requested message goes into P:o:<g>, the hash of the window g = now / dedupe_window it
 * arrived in, and stays there: a purge writes nothing for dedupe, which was half of what an ack
 * cost Redis (reading each origin back from its blob, deleting it, writing a mark). A put or a
 * <received/> looks in every window from P:og, the oldest whose hash may still hold a queued
 * message, to now (64 at most: a window far shorter than archive_after is warned about at start),
 * and always in the one before now; origins_trim (LUA_HELPERS) gives older hashes a TTL. Versions
 * before 2026-12 kept P:o (queued origins) and P:dd:<w> (the origins of messages purged in window
 * w, with a TTL): the first put, ack or purge of a user without P:og makes them the hashes of this
 * window and the one before (origins_upgrade). That also runs after an eviction, which gave every
 * hash a TTL: this window's, which new origins go into, loses it again. (The P:dd:<origin>
 * strings of versions before 2026-11 are no longer read: they lived one window, and reading them
 * cost a put 3% of its Redis instructions.) Each window's key suffix is built once per call:
 * string concatenation is what a put's Lua spends most on. The window comes from Redis' clock once
 * per script call: the puts of one put_many call happen at one instant as far as dedupe can tell.
 * origin_find also returns the key of this window's hash, where a new origin goes. */
#define LUA_ORIGINS                                                                                \
    "local window_at, window_sfx = nil, {}\n"                                                      \
    "local function window_now()\n"                                                                \
    "  if window_at then return window_at end\n"                                                   \
    "  local t = redis.call('TIME')\n"                                                             \
    "  window_at = math.floor((tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)) / "      \
    "DEDUPE_MS)\n"                                                                                 \
    "  return window_at\n"                                                                         \
    "end\n"                                                                                        \
    "local function origins_key(P, g)\n"                                                           \
    "  local sfx = window_sfx[g]\n"                                                                \
    "  if not sfx then sfx = ':o:' .. g; window_sfx[g] = sfx end\n"                                \
    "  return P .. sfx\n"                                                                          \
    "end\n"                                                                                        \
    "local function origins_upgrade(P)\n"                                                          \
    "  local w = window_now()\n"                                                                   \
    "  local cur, prev, d = P .. ':o:' .. w, P .. ':o:' .. (w - 1), P .. ':dd:' .. (w - 1)\n"      \
    "  if redis.call('EXISTS', P .. ':o') == 1 then redis.call('RENAME', P .. ':o', cur) end\n"    \
    "  if redis.call('EXISTS', d) == 1 and redis.call('EXISTS', prev) == 0 then\n"                 \
    "    redis.call('RENAME', d, prev)\n"                                                          \
    "  end\n"                                                                                      \
    "  d = P .. ':dd:' .. w\n"                                                                     \
    "  if redis.call('EXISTS', d) == 1 then\n"                                                     \
    "    if redis.call('EXISTS', cur) == 0 then\n"                                                 \
    "      redis.call('RENAME', d, cur)\n"                                                         \
    "    else\n"                                                                                   \
    "      local kv = redis.call('HGETALL', d)\n"                                                  \
    "      for i = 1, #kv, 1000 do redis.call('HSET', cur, unpack(kv, i, math.min(i + 999, "       \
    "#kv))) end\n"                                                                                 \
    "      redis.call('DEL', d)\n"                                                                 \
    "    end\n"                                                                                    \
    "  end\n"                                                                                      \
    "  redis.call('PERSIST', cur)\n"                                                               \
    "  redis.call('SET', P .. ':og', w)\n"                                                         \
    "  return w\n"                                                                                 \
    "end\n"                                                                                        \
    "local function origins_oldest(P, og)\n"                                                       \
    "  if og then return num(og) end\n"                                                            \
    "  if redis.call('EXISTS', P .. ':seq') == 0 then return window_now() end\n"                   \
    "  return origins_upgrade(P)\n"                                                                \
    "end\n"                                                                                        \
    "local function origin_find(P, okey, oldest)\n"                                                \
    "  local w = window_now()\n"                                                                   \
    "  local cur = origins_key(P, w)\n"                                                            \
    "  local sid = redis.call('HGET', cur, okey)\n"                                                \
    "  if sid then return sid, cur end\n"                                                          \
    "  for g = w - 1, math.max(math.min(oldest, w - 1), w - 63), -1 do\n"                          \
    "    sid = redis.call('HGET', origins_key(P, g), okey)\n"                                      \
    "    if sid then return sid, cur end\n"                                                        \
    "  end\n"                                                                                      \
    "  return nil, cur\n"                                                                          \
    "end\n"

/* Everything, for the scripts that read devices and acks or purge. hmget and bulk send one
 * command for many fields, in slices of 1000 because Redis' Lua 5.1 cannot unpack more than about
 * 8000 values into one call. purge_many removes messages ({S, blob, acked list or false} each)
 * with one command per key (none for keys that do not exist: P:pw of offline messages, the legacy
 * P:k), taking back the counts of the devices that had acked them; the other purges are purge_many
 * of one message. Their origins stay where they are; origins_trim then gives the hashes of windows
 * with nothing queued left their TTL. has() compares a list of one device (the usual case) whole,
 * without building two strings. */
#define LUA_HELPERS                                                                                \
    LUA_ONLINE LUA_ORIGINS                                                                         \
        "local function split(member) return string.match(member, '^(%S+) (.*)$') end\n"           \
        "local function has(list, dev)\n"                                                          \
        "  if list == dev then return true end\n"                                                  \
        "  if not string.find(list, '\\n', 1, true) then return false end\n"                       \
        "  return string.find('\\n' .. list .. '\\n', '\\n' .. dev .. '\\n', 1, true) ~= nil\n"    \
        "end\n"                                                                                    \
        "local function acked_by(P, sid, dev)\n"                                                   \
        "  local list = redis.call('HGET', P .. ':ak', sid)\n"                                     \
        "  return list and has(list, dev)\n"                                                       \
        "end\n"                                                                                    \
        "local function known_devices(P)\n"                                                        \
        "  local k = redis.call('HKEYS', P .. ':dev')\n"                                           \
        "  for _, r in ipairs(online(P)) do k[#k + 1] = r end\n"                                   \
        "  return k\n"                                                                             \
        "end\n"                                                                                    \
        "local function all_acked(list, known)\n"                                                  \
        "  for _, d in ipairs(known) do if not has(list, d) then return false end end\n"           \
        "  return true\n"                                                                          \
        "end\n"                                                                                    \
        "local function hmget(key, fields)\n"                                                      \
        "  local res = {}\n"                                                                       \
        "  for i = 1, #fields, 1000 do\n"                                                          \
        "    local part = redis.call('HMGET', key, unpack(fields, i, math.min(i + 999, "           \
        "#fields)))\n"                                                                             \
        "    for j = 1, #part do res[#res + 1] = part[j] end\n"                                    \
        "  end\n"                                                                                  \
        "  return res\n"                                                                           \
        "end\n"                                                                                    \
        "local function bulk(cmd, key, args)\n"                                                    \
        "  for i = 1, #args, 1000 do\n"                                                            \
        "    redis.call(cmd, key, unpack(args, i, math.min(i + 999, #args)))\n"                    \
        "  end\n"                                                                                  \
        "end\n"                                                                                    \
        "local function origin_of(blob)\n"                                                         \
        "  local fl, lf, lt, li, at = string.match(blob, '^1 %-?%d+ (%d+) (%d+) (%d+) "            \
        "(%d+)\\n()')\n"                                                                           \
        "  if not at or tonumber(fl) % 2 == 0 or li == '0' then return nil end\n"                  \
        "  lf, lt, li = tonumber(lf), tonumber(lt), tonumber(li)\n"                                \
        "  local from = string.sub(blob, at, at + lf - 1)\n"                                       \
        "  local id = string.sub(blob, at + lf + lt, at + lf + lt + li - 1)\n"                     \
        "  return string.match(from, '^[^/]*') .. ' ' .. id\n"                                     \
        "end\n"                                                                                    \
        "local function stamp_of(blob) return tonumber(string.match(blob, '^%d+ (%d+) ')) end\n"   \
        "local function origins_trim(P)\n"                                                         \
        "  local og = redis.call('GET', P .. ':og')\n"                                             \
        "  local w = window_now()\n"                                                               \
        "  if not og or tonumber(og) >= w - 1 then return end\n"                                   \
        "  local keep = w\n"                                                                       \
        "  local first = redis.call('ZRANGE', P .. ':q', 0, 0)[1]\n"                               \
        "  if first then\n"                                                                        \
        "    local st = stamp_of(redis.call('HGET', P .. ':m', first) or '')\n"                    \
        "    if st then keep = math.min(keep, math.floor(st / DEDUPE_MS)) end\n"                   \
        "  end\n"                                                                                  \
        "  keep = keep - 1\n"                                                                      \
        "  for g = tonumber(og), keep - 1 do\n"                                                    \
        "    redis.call('PEXPIREAT', P .. ':o:' .. g, (g + 2) * DEDUPE_MS)\n"                      \
        "  end\n"                                                                                  \
        "  if keep > tonumber(og) then redis.call('SET', P .. ':og', keep) end\n"                  \
        "end\n"                                                                                    \
        "local function purge_many(P, msgs)\n"                                                     \
        "  local gone, listed, bytes, minus, order = {}, {}, 0, {}, {}\n"                          \
        "  for _, m in ipairs(msgs) do\n"                                                          \
        "    local sid, blob, list = m[1], m[2], m[3]\n"                                           \
        "    gone[#gone + 1] = sid\n"                                                              \
        "    bytes = bytes + #blob\n"                                                              \
        "    if list then\n"                                                                       \
        "      listed[#listed + 1] = sid\n"                                                        \
        "      for d in string.gmatch(list, '[^\\n]+') do\n"                                       \
        "        if not minus[d] then minus[d] = {0, 0}; order[#order + 1] = d end\n"              \
        "        minus[d][1] = minus[d][1] + 1\n"                                                  \
        "        minus[d][2] = minus[d][2] + #blob\n"                                              \
        "      end\n"                                                                              \
        "    end\n"                                                                                \
        "  end\n"                                                                                  \
        "  if #gone == 0 then return end\n"                                                        \
        "  for _, d in ipairs(order) do\n"                                                         \
        "    redis.call('HINCRBY', P .. ':an', d, -minus[d][1])\n"                                 \
        "    redis.call('HINCRBY', P .. ':ab', d, -minus[d][2])\n"                                 \
        "  end\n"                                                                                  \
        "  bulk('HDEL', P .. ':ak', listed)\n"                                                     \
        "  bulk('HDEL', P .. ':m', gone)\n"                                                        \
        "  if redis.call('EXISTS', P .. ':pw') == 1 then bulk('HDEL', P .. ':pw', gone) end\n"     \
        "  bulk('ZREM', P .. ':q', gone)\n"                                                        \
        "  redis.call('DECRBY', P .. ':qb', bytes)\n"                                              \
        "  if redis.call('EXISTS', P .. ':k') == 1 then bulk('HDEL', P .. ':k', gone) end\n"       \
        "  origins_trim(P)\n"                                                                      \
        "end\n"                                                                                    \
        "local function purge_listed(P, sid, blob, list) purge_many(P, {{sid, blob, list}}) end\n" \
        "local function purge(P, sid, blob)\n"                                                     \
        "  purge_listed(P, sid, blob, redis.call('HGET', P .. ':ak', sid))\n"                      \
        "end\n"                                                                                    \
        "local function purge_if_done(P, sid, blob, known)\n"                                      \
        "  local list = redis.call('HGET', P .. ':ak', sid)\n"                                     \
        "  if not list or not all_acked(list, known) then return false end\n"                      \
        "  purge_listed(P, sid, blob, list)\n"                                                     \
        "  return true\n"                                                                          \
        "end\n"                                                                                    \
        "local function device_offline(P, dev)\n"                                                  \
        "  local known = nil\n"                                                                    \
        "  for _, m in ipairs(redis.call('ZRANGE', P .. ':p', 0, -1)) do\n"                        \
        "    local sid, d = split(m)\n"                                                            \
        "    if d == dev then\n"                                                                   \
        "      redis.call('ZREM', P .. ':p', m)\n"                                                 \
        "      local blob = redis.call('HGET', P .. ':m', sid)\n"                                  \
        "      known = known or known_devices(P)\n"                                                \
        "      if blob then purge_if_done(P, sid, blob, known) end\n"                              \
        "    end\n"                                                                                \
        "  end\n"                                                                                  \
        "end\n"

/* A device's view of the queue: what it has not acked, oldest first after the cursor `after`,
 * at most n, examining at most scan entries so that a device that acked a long stretch cannot
 * make one call block Redis. Returns the sids and the cursor (last sid examined, or nil) and
 * whether the end of the queue was reached. It reads the queue in chunks about the size of the
 * page and asks P:ak about a whole chunk in one HMGET. A member's score is its seq, the number
 * its sid starts with, so the next chunk starts after the last sid's seq: asking Redis for the
 * scores as well cost it a float formatted per member. */
#define LUA_VIEW                                                                                   \
    "local function view(P, dev, after, n, scan)\n"                                                \
    "  local out, cursor, seen, lo = {}, nil, 0, '(' .. after\n"                                   \
    "  while true do\n"                                                                            \
    "    local want = math.max(16, math.min(n - #out + 1, 512))\n"                                 \
    "    local ids = redis.call('ZRANGEBYSCORE', P .. ':q', lo, '+inf', 'LIMIT', 0, want)\n"       \
    "    if #ids == 0 then return out, cursor, true end\n"                                         \
    "    local lists = redis.call('HMGET', P .. ':ak', unpack(ids))\n"                             \
    "    for i, sid in ipairs(ids) do\n"                                                           \
    "      if #out >= n or seen >= scan then return out, cursor, false end\n"                      \
    "      seen = seen + 1\n"                                                                      \
    "      local list = lists[i]\n"                                                                \
    "      if not (list and has(list, dev)) then out[#out + 1] = sid end\n"                        \
    "      cursor = sid\n"                                                                         \
    "    end\n"                                                                                    \
    "    lo = '(' .. string.match(cursor, '^%d+')\n"                                               \
    "  end\n"                                                                                      \
    "end\n"                                                                                        \
    "local function touch(P, dev, now)\n"                                                          \
    "  if redis.call('HEXISTS', P .. ':dev', dev) == 1 then redis.call('HSET', P .. ':dev', dev, " \
    "now) end\n"                                                                                   \
    "end\n"

/* KEYS: P, and on a single Redis also the user's index shard (due, online, arch, act), which it
 * then keeps up to date itself; in a cluster those are in another slot and the caller sends
 * index_put first. ARGV: user, sender, orig id ('' = none), suffix, blob, track (1 = receipt
 * requested: dedupe and keep pending), now, retry_ms, window_ms, max_n, max_b.
 * Returns {'dup', S} | {'full'} | {'live', S or '', resource...} | {'offline', S} | {'cold'}:
 * the user has no state here (new, or evicted to the archive); the caller restores it first.
 * The archive and eviction indexes are written when the queue was empty: a user with queued
 * messages is on both already (writing them at every put was a tenth of its Redis instructions).
 * The archive entry is then set, not only added: the new message is the oldest, and a sweep that
 * claimed the user (its score is then the lease) and emptied the queue would otherwise take the
 * user off the index after this put. Both are added again, if absent, at every 64th message: an
 * entry lost some other way (a crash between a restore and its index write) comes back. */
#define LUA_PUT_BODY                                                                               \
    "local P, user, sender, oid, blob = KEYS[k + 1], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], "      \
    "ARGV[a + 5]\n"                                                                                \
    "local track, now = ARGV[a + 6] == '1', num(ARGV[a + 7])\n"                                    \
    "local res = nil\n"                                                                            \
    "if not track then\n"                                                                          \
    "  res = online(P)\n"                                                                          \
    "  if #res > 0 then return {'live', '', unpack(res)} end\n"                                    \
    "end\n"                                                                                        \
    "local okey = track and oid ~= '' and sender .. ' ' .. oid or nil\n"                           \
    "local kseq, kqb, ko = P .. ':seq', P .. ':qb', nil\n"                                         \
    "local st = okey and redis.call('MGET', kseq, kqb, P .. ':og') or redis.call('MGET', kseq, "   \
    "kqb)\n"                                                                                       \
    "if not st[1] then return {'cold'} end\n"                                                      \
    "if okey then\n"                                                                               \
    "  local prev\n"                                                                               \
    "  prev, ko = origin_find(P, okey, origins_oldest(P, st[3]))\n"                                \
    "  if prev then return {'dup', prev} end\n"                                                    \
    "end\n"                                                                                        \
    "res = res or online(P)\n"                                                                     \
    "local b = tonumber(st[2] or '0')\n"                                                           \
    "local q = P .. ':q'\n"                                                                        \
    "local queued = redis.call('ZCARD', q)\n"                                                      \
    "if queued >= num(ARGV[a + 10]) or b + #blob > num(ARGV[a + 11]) then\n"                       \
    "  return {'full'}\n"                                                                          \
    "end\n"                                                                                        \
    "local n = tonumber(st[1]) + 1\n"                                                              \
    "local seq = tostring(n)\n"                                                                    \
    "local sid = seq .. '-' .. ARGV[a + 4]\n"                                                      \
    "redis.call('MSET', kseq, seq, kqb, b + #blob)\n"                                              \
    "redis.call('HSET', P .. ':m', sid, blob)\n"                                                   \
    "redis.call('ZADD', q, seq, sid)\n"                                                            \
    "if okey then redis.call('HSET', ko, okey, sid) end\n"                                         \
    "if indexed then\n"                                                                            \
    "  if queued == 0 then\n"                                                                      \
    "    redis.call('ZADD', KEYS[k + 4], ARGV[a + 7], user)\n"                                     \
    "    redis.call('ZADD', KEYS[k + 5], 'NX', ARGV[a + 7], user)\n"                               \
    "  elseif n % 64 == 0 then\n"                                                                  \
    "    redis.call('ZADD', KEYS[k + 4], 'NX', ARGV[a + 7], user)\n"                               \
    "    redis.call('ZADD', KEYS[k + 5], 'NX', ARGV[a + 7], user)\n"                               \
    "  end\n"                                                                                      \
    "  if #res > 0 then redis.call('ZADD', KEYS[k + 2], 'LT', now + num(ARGV[a + 8]), user) end\n" \
    "end\n"                                                                                        \
    "if #res == 0 then return {'offline', sid} end\n"                                              \
    "local due = now + num(ARGV[a + 8])\n"                                                         \
    "for _, r in ipairs(res) do redis.call('ZADD', P .. ':p', due, sid .. ' ' .. r) end\n"         \
    "redis.call('HSET', P .. ':pw', sid, now + num(ARGV[a + 9]))\n"                                \
    "return {'live', sid, unpack(res)}\n"

/* The body reads put i's keys and arguments in place, at offsets k and a, from KEYS and ARGV
 * held in locals (a global lookup costs each access): copying them into two new tables was a
 * sixth of what a relayed receipt (a put to an online sender) cost Redis inside put_many. */
static const char put_lua[] = LUA_PROLOGUE LUA_ONLINE LUA_ORIGINS
    "local KEYS, k, a, indexed = KEYS, 0, 0, #KEYS == 5\n" LUA_PUT_BODY;

/* KEYS: the five keys of each put in turn (a single Redis only). ARGV: the eleven arguments of
 * each put in turn. Runs the puts in order, as separate put calls would, and returns their
 * replies in an array. One call for the puts of a loop turn spares Redis the cost of a script
 * call for each, which is most of what a put to an online recipient (a relayed receipt) costs. */
static const char put_many_lua[] =
    /* LUA_PROLOGUE without its copy of ARGV, 2% of a put here: the puts read their arguments
     * past the epoch and dedupe window in place. */
    "local EPOCH, DEDUPE_MS = ARGV[1], tonumber(ARGV[2])\n" LUA_ONLINE LUA_ORIGINS
    "local indexed = true\n"
    "local function put(KEYS, ARGV, k, a)\n" LUA_PUT_BODY "end\n"
    "local out = {}\n"
    "for i = 0, #KEYS / 5 - 1 do out[i + 1] = put(KEYS, ARGV, 5 * i, 11 * i + 2) end\n"
    "return out\n";

/* KEYS: P. ARGV: device, now, 'sid', S... | 'orig', "sender origid". The device has the
 * messages: it becomes a known device, its pending deliveries of them end, and each message is
 * purged once every known device acked it. Returns {archived (0|1), known devices (newline-
 * separated), {S found here...}, S, blob, ...}, the pairs being the messages acked for the first
 * time by any device: the receipts to relay, once per message.
 * A client acks a page of a hundred or more messages at once: each key is read and written with
 * one command for all of them (HMGET, HDEL, ZREM with many fields) rather than one per message,
 * which is what a retrieval costs Redis. */
static const char ack_lua[] = LUA_PROLOGUE LUA_HELPERS
    "local P, dev, found = KEYS[1], ARGV[1], {}\n"
    "local out = {redis.call('EXISTS', P .. ':ar'), '', found}\n"
    "redis.call('HSET', P .. ':dev', dev, ARGV[2])\n"
    "local known = known_devices(P)\n"
    "out[2] = table.concat(known, '\\n')\n"
    "local sids, seen = {}, {}\n"
    "if ARGV[3] == 'orig' then\n"
    "  sids[1] = origin_find(P, ARGV[4], origins_oldest(P, redis.call('GET', P .. ':og')))\n"
    "else\n"
    "  for i = 4, #ARGV do\n"
    "    if not seen[ARGV[i]] then seen[ARGV[i]] = true; sids[#sids + 1] = ARGV[i] end\n"
    "  end\n"
    "end\n"
    "if #sids == 0 then return out end\n"
    "local blobs, lists = hmget(P .. ':m', sids), hmget(P .. ':ak', sids)\n"
    "local ends, acks, gone, n, b = {}, {}, {}, 0, 0\n"
    "local pending = redis.call('EXISTS', P .. ':p') == 1\n"
    "for i, sid in ipairs(sids) do\n"
    "  local blob, list = blobs[i], lists[i]\n"
    "  if blob then\n"
    "    found[#found + 1] = sid\n"
    "    if pending then ends[#ends + 1] = sid .. ' ' .. dev end\n"
    "    if not (list and has(list, dev)) then\n"
    "      if not list then\n"
    "        out[#out + 1] = sid\n"
    "        out[#out + 1] = blob\n"
    "      end\n"
    "      local now_acked = list and (list .. '\\n' .. dev) or dev\n"
    "      if all_acked(now_acked, known) then\n"
    "        gone[#gone + 1] = {sid, blob, list}\n"
    "      else\n"
    "        acks[#acks + 1] = sid\n"
    "        acks[#acks + 1] = now_acked\n"
    "        n, b = n + 1, b + #blob\n"
    "      end\n"
    "    end\n"
    "  end\n"
    "end\n"
    "bulk('ZREM', P .. ':p', ends)\n"
    "if n > 0 then\n"
    "  bulk('HSET', P .. ':ak', acks)\n"
    "  redis.call('HINCRBY', P .. ':an', dev, n)\n"
    "  redis.call('HINCRBY', P .. ':ab', dev, b)\n"
    "end\n"
    "purge_many(P, gone)\n"
    "return out\n";

/* KEYS: P. ARGV: user, resource. A push to the resource bounced: it is gone, and its pending
 * deliveries end (what it has not acked stays in the queue if it is a known device). Returns how
 * many resources are still registered (0: the caller takes the user off the online index). */
static const char bounce_lua[] = LUA_PROLOGUE LUA_HELPERS "local P = KEYS[1]\n"
                                                          "redis.call('HDEL', P .. ':r', ARGV[2])\n"
                                                          "device_offline(P, ARGV[2])\n"
                                                          "return redis.call('HLEN', P .. ':r')\n";

/* KEYS: P. ARGV: now, retry_ms. The user's pending deliveries that are due: past their delivery
 * window or to a resource no longer online they end (the message stays in the queue), otherwise
 * they are rescheduled and returned for retransmission. Returns {next due (-1: none left),
 * resource, {S, blob, ...}, resource, {...}, ...}, one group per resource with something to
 * resend. */
static const char due_lua[] = LUA_PROLOGUE LUA_HELPERS
    "local P, now, retry = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])\n"
    "local on, groups, order = {}, {}, {}\n"
    "for _, r in ipairs(online(P)) do on[r] = true end\n"
    "for _, m in ipairs(redis.call('ZRANGEBYSCORE', P .. ':p', '-inf', now)) do\n"
    "  local sid, dev = split(m)\n"
    "  local blob = redis.call('HGET', P .. ':m', sid)\n"
    "  local deadline = tonumber(redis.call('HGET', P .. ':pw', sid) or '0')\n"
    "  if not blob or not on[dev] or deadline <= now then\n"
    "    redis.call('ZREM', P .. ':p', m)\n"
    "  else\n"
    "    redis.call('ZADD', P .. ':p', now + retry, m)\n"
    "    if not groups[dev] then groups[dev] = {}; order[#order + 1] = dev end\n"
    "    local g = groups[dev]\n"
    "    g[#g + 1] = sid\n"
    "    g[#g + 1] = blob\n"
    "  end\n"
    "end\n"
    "local nxt = redis.call('ZRANGE', P .. ':p', 0, 0, 'WITHSCORES')\n"
    "local out = {#nxt == 0 and -1 or tonumber(nxt[2])}\n"
    "for _, dev in ipairs(order) do\n"
    "  out[#out + 1] = dev\n"
    "  out[#out + 1] = groups[dev]\n"
    "end\n"
    "return out\n";

/* KEYS: P. ARGV: 'set' | 'del' | 'verify', user, resource, now.
 * 'verify' marks a resource online again only if it is still registered (it answered our ping
 * after a reconnect, and no unavailable came in between). A resource that leaves ends its
 * pending deliveries at once: no retry interval to wait out. Returns how many resources are
 * registered (the caller keeps the online index in step). */
static const char presence_lua[] = LUA_PROLOGUE LUA_HELPERS LUA_VIEW
    "local P, op, user, res = KEYS[1], ARGV[1], ARGV[2], ARGV[3]\n"
    "if op == 'set' then\n"
    "  if redis.call('HEXISTS', P .. ':r', res) == 0 then redis.call('HSET', P .. ':r', res, 0) "
    "end\n"
    "  register(P, res)\n"
    "  touch(P, res, ARGV[4])\n"
    "elseif op == 'verify' then\n"
    "  if redis.call('HEXISTS', P .. ':r', res) == 1 then register(P, res) end\n"
    "else\n"
    "  redis.call('HDEL', P .. ':r', res)\n"
    "  device_offline(P, res)\n"
    "end\n"
    "return redis.call('HLEN', P .. ':r')\n";

/* KEYS: P. Returns the user's resources registered under an older link epoch: to ping after a
 * reconnect. */
static const char stale_lua[] =
    LUA_PROLOGUE LUA_HELPERS "local out, rs = {}, redis.call('HGETALL', KEYS[1] .. ':r')\n"
                             "for i = 1, #rs, 2 do if tonumber(rs[i + 1]) < EPOCH_N then "
                             "out[#out + 1] = rs[i] end end\n"
                             "return out\n";

/* KEYS: P. ARGV: device, now, max items. The device's view: what it has not acked.
 * Returns {count, bytes, oldest blob, newest blob, archived (0|1), S, blob, ...} with the blobs ''
 * when the view is empty and up to max (S, blob) pairs, oldest first. */
static const char summary_lua[] = LUA_PROLOGUE LUA_HELPERS LUA_VIEW
    "local P, dev, max = KEYS[1], ARGV[1], tonumber(ARGV[3])\n"
    "touch(P, dev, ARGV[2])\n"
    "local count = redis.call('ZCARD', P .. ':q') - tonumber(redis.call('HGET', P .. ':an', dev) "
    "or '0')\n"
    "local bytes = tonumber(redis.call('GET', P .. ':qb') or '0') -\n"
    "              tonumber(redis.call('HGET', P .. ':ab', dev) or '0')\n"
    "local out = {count, bytes, '', '', redis.call('EXISTS', P .. ':ar')}\n"
    "local first = view(P, dev, 0, math.max(max, 1), 4096)\n"
    "if first[1] then out[3] = redis.call('HGET', P .. ':m', first[1]) end\n"
    "for i = 0, 4095, 64 do\n"
    "  local chunk = redis.call('ZREVRANGE', P .. ':q', i, i + 63)\n"
    "  if #chunk == 0 then break end\n"
    "  local hit = nil\n"
    "  for _, sid in ipairs(chunk) do\n"
    "    if not acked_by(P, sid, dev) then hit = sid; break end\n"
    "  end\n"
    "  if hit then out[4] = redis.call('HGET', P .. ':m', hit); break end\n"
    "end\n"
    "if max > 0 then\n"
    "  for _, sid in ipairs(first) do\n"
    "    out[#out + 1] = sid\n"
    "    out[#out + 1] = redis.call('HGET', P .. ':m', sid) or ''\n"
    "  end\n"
    "end\n"
    "return out\n";

/* KEYS: P. ARGV: device, now, after seq, max, max bytes, per-message overhead. The device's
 * view, oldest first after the cursor; always at least one message, so a single large one cannot
 * stall the reader. Returns {complete (0|1), cursor ('' for none), archived (0|1), S, blob, ...};
 * the next page
 * starts after the cursor, which may be past the last item when acked messages were skipped. */
static const char fetch_lua[] = LUA_PROLOGUE LUA_HELPERS LUA_VIEW
    "local P, dev = KEYS[1], ARGV[1]\n"
    "local max, budget, over = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])\n"
    "touch(P, dev, ARGV[2])\n"
    "local sids, cursor, at_end = view(P, dev, ARGV[3], max + 1, 4 * max + 1000)\n"
    "local out, used, taken = {0, '', redis.call('EXISTS', P .. ':ar')}, 0, 0\n"
    "local blobs = hmget(P .. ':m', sids)\n"
    "for i, sid in ipairs(sids) do\n"
    "  if taken == max then break end\n"
    "  local blob = blobs[i] or ''\n"
    "  if taken > 0 and used + #blob + over > budget then break end\n"
    "  used = used + #blob + over\n"
    "  taken = taken + 1\n"
    "  out[#out + 1] = sid\n"
    "  out[#out + 1] = blob\n"
    "end\n"
    "if taken < #sids then\n"
    "  out[2] = out[#out - 1]\n"
    "else\n"
    "  out[2] = cursor or ''\n"
    "  if at_end then out[1] = 1 end\n"
    "end\n"
    "return out\n";

/* KEYS: P. ARGV: cutoff, now, max. The user's oldest messages stamped before cutoff and out of
 * their delivery window, oldest first, stopping at the first younger one. Marks the user as
 * having an archive (P:ar) before anything is copied, so acks from now on also go to the archive.
 * Returns {S, blob, acked, origin, ...}; nothing is removed here. */
static const char archive_take_lua[] = LUA_PROLOGUE LUA_HELPERS
    "local P, cutoff, now = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])\n"
    "local msgs = {}\n"
    "for _, sid in ipairs(redis.call('ZRANGE', P .. ':q', 0, tonumber(ARGV[3]) - 1)) do\n"
    "  local blob = redis.call('HGET', P .. ':m', sid)\n"
    "  local st = blob and stamp_of(blob) or 0\n"
    "  local window = tonumber(redis.call('HGET', P .. ':pw', sid) or '0')\n"
    "  if st >= cutoff or window > now then break end\n"
    "  msgs[#msgs + 1] = sid\n"
    "  msgs[#msgs + 1] = blob\n"
    "  msgs[#msgs + 1] = redis.call('HGET', P .. ':ak', sid) or ''\n"
    "  msgs[#msgs + 1] = blob and origin_of(blob) or ''\n"
    "end\n"
    "if #msgs > 0 then redis.call('SET', P .. ':ar', '1') end\n"
    "return msgs\n";

/* KEYS: P. ARGV: now, S... The archive committed these messages: remove them here. Returns when
 * the user is next due for archiving: the stamp of its oldest remaining message (or, while that
 * one is in its delivery window, the window's end), -1 when nothing is left. */
static const char archive_drop_lua[] = LUA_PROLOGUE LUA_HELPERS
    "local P = KEYS[1]\n"
    "for i = 2, #ARGV do\n"
    "  local blob = redis.call('HGET', P .. ':m', ARGV[i])\n"
    "  if blob then\n"
    "    for _, m in ipairs(redis.call('ZRANGE', P .. ':p', 0, -1)) do\n"
    "      if split(m) == ARGV[i] then redis.call('ZREM', P .. ':p', m) end\n"
    "    end\n"
    "    purge(P, ARGV[i], blob)\n"
    "  end\n"
    "end\n"
    "local first = redis.call('ZRANGE', P .. ':q', 0, 0)[1]\n"
    "if not first then return -1 end\n"
    "local st = stamp_of(redis.call('HGET', P .. ':m', first) or '') or tonumber(ARGV[1])\n"
    "local window = tonumber(redis.call('HGET', P .. ':pw', first) or '0')\n"
    "return math.max(st, window)\n";

/* KEYS: P. ARGV: now, forget_ms. The user did something (presence, IQ): forgets devices not seen
 * for forget_ms, and returns 1 when the user has no state here (new, or evicted: the caller
 * restores it from the archive). */
static const char activity_lua[] =
    LUA_PROLOGUE "local P, now = KEYS[1], tonumber(ARGV[1])\n"
                 "local devs = redis.call('HGETALL', P .. ':dev')\n"
                 "for i = 1, #devs, 2 do\n"
                 "  if tonumber(devs[i + 1]) < now - tonumber(ARGV[2]) then redis.call('HDEL', P "
                 ".. ':dev', devs[i]) end\n"
                 "end\n"
                 "return redis.call('EXISTS', P .. ':seq') == 0 and 1 or 0\n";

/* KEYS: P. ARGV: seq, archived (0|1), device, seen, ... Brings back what eviction kept in the
 * archive (or creates the state of a new user: seq 0, no devices). */
static const char restore_lua[] = LUA_PROLOGUE
    "local P = KEYS[1]\n"
    "if tonumber(redis.call('GET', P .. ':seq') or '-1') < tonumber(ARGV[1]) then\n"
    "  redis.call('SET', P .. ':seq', ARGV[1])\n"
    "end\n"
    "for i = 3, #ARGV, 2 do redis.call('HSETNX', P .. ':dev', ARGV[i], ARGV[i + 1]) end\n"
    "if ARGV[2] == '1' then redis.call('SET', P .. ':ar', '1') end\n"
    "return 1\n";

/* KEYS: P. ARGV: max messages. The user's state to move to the archive, unless somebody is online
 * or a delivery is pending. Returns {} in that case, else {seq, {device, seen, ...}, complete
 * (0|1), {S, blob, acked, origin, ...}}; complete 0 when more than max messages remain (the rest go
 * in a later pass). */
static const char evict_take_lua[] = LUA_PROLOGUE LUA_HELPERS
    "local P, per = KEYS[1], tonumber(ARGV[1])\n"
    "if #online(P) > 0 or redis.call('ZCARD', P .. ':p') > 0 then return {} end\n"
    "local sids = redis.call('ZRANGE', P .. ':q', 0, per)\n"
    "local msgs = {}\n"
    "for i = 1, math.min(#sids, per) do\n"
    "  local sid = sids[i]\n"
    "  msgs[#msgs + 1] = sid\n"
    "  local blob = redis.call('HGET', P .. ':m', sid) or ''\n"
    "  msgs[#msgs + 1] = blob\n"
    "  msgs[#msgs + 1] = redis.call('HGET', P .. ':ak', sid) or ''\n"
    "  msgs[#msgs + 1] = origin_of(blob) or ''\n"
    "end\n"
    "redis.call('SET', P .. ':ar', '1')\n"
    "return {redis.call('GET', P .. ':seq') or '0', redis.call('HGETALL', P .. ':dev'),\n"
    "        #sids <= per and 1 or 0, msgs}\n";

/* KEYS: P, and on a single Redis also the user's index shard (due, online, arch, act). ARGV:
 * evict (0|1), S... The archive committed these messages (and, with evict 1, the user's state):
 * delete them here; with evict 1 and nothing left and nobody online, delete all of the user's
 * state. Returns 1 when evicted. The origin hashes stay until two windows after their own, like
 * those of purged messages; the archive has the origins of what it took. Given the index keys, it
 * also takes the user off every index in the same step: removed later (in a cluster the caller
 * sends index_user 'forget'), the entries a put wrote meanwhile for a user it had just brought
 * back would go too. */
static const char evict_drop_lua[] = LUA_PROLOGUE LUA_HELPERS
    "local P = KEYS[1]\n"
    "for i = 2, #ARGV do\n"
    "  local blob = redis.call('HGET', P .. ':m', ARGV[i])\n"
    "  if blob then purge(P, ARGV[i], blob) end\n"
    "end\n"
    "if ARGV[1] ~= '1' or redis.call('ZCARD', P .. ':q') > 0 or #online(P) > 0 or\n"
    "   redis.call('ZCARD', P .. ':p') > 0 then return 0 end\n"
    "local og = redis.call('GET', P .. ':og')\n"
    "for g = tonumber(og or window_now()), window_now() do\n"
    "  redis.call('PEXPIREAT', P .. ':o:' .. g, (g + 2) * DEDUPE_MS)\n"
    "end\n"
    "for _, k in ipairs({'seq', 'm', 'q', 'qb', 'ak', 'an', 'ab', 'dev', 'p', 'pw', 'og', 'o', "
    "'k', "
    "'r', 'ar'}) do\n"
    "  redis.call('DEL', P .. ':' .. k)\n"
    "end\n"
    "if #KEYS == 5 then\n"
    "  local u = string.sub(P, 5, -2)\n"
    "  redis.call('ZREM', KEYS[2], u)\n"
    "  redis.call('SREM', KEYS[3], u)\n"
    "  redis.call('ZREM', KEYS[4], u)\n"
    "  redis.call('ZREM', KEYS[5], u)\n"
    "end\n"
    "return 1\n";

/* ---- the sharded indexes: KEYS are the four index keys of one shard (one slot): due, online,
 * arch, act (storage/SCHEMA.md). ---- */

/* ARGV: (user, due (0: not live), now) one or more times, the users of one shard whose messages
 * were stored in one turn of the loop. A message was stored for user: index it for retransmission
 * (keeping an earlier due), archiving and eviction (keeping the earlier stamps). Sent before the
 * message's own script, so a crash in between leaves at worst an index entry with nothing behind
 * it, which the next pass drops. */
static const char index_put_lua[] =
    LUA_PROLOGUE "for i = 1, #ARGV - 2, 3 do\n"
                 "  local u, due, now = ARGV[i], ARGV[i + 1], ARGV[i + 2]\n"
                 "  if tonumber(due) > 0 then redis.call('ZADD', KEYS[1], 'LT', due, u) end\n"
                 "  redis.call('ZADD', KEYS[3], 'NX', now, u)\n"
                 "  redis.call('ZADD', KEYS[4], 'NX', now, u)\n"
                 "end\n"
                 "return 1\n";

/* ARGV: which (1 due, 3 arch, 4 act), limit, lease, max. Claims up to max users whose score is
 * at most limit by setting their score to lease, so that another instance sharing the indexes
 * does not claim them too before the lease ends. Returns the users. */
static const char index_claim_lua[] = LUA_PROLOGUE
    "local idx = KEYS[tonumber(ARGV[1])]\n"
    "local users = redis.call('ZRANGEBYSCORE', idx, '-inf', ARGV[2], 'LIMIT', 0, ARGV[4])\n"
    "for _, u in ipairs(users) do redis.call('ZADD', idx, ARGV[3], u) end\n"
    "return users\n";

/* ARGV: which, user, score (-1: none), lease. After a claimed user was handled: its next score,
 * or off the index when nothing is left, unless a writer changed the entry since the claim (then
 * only an earlier score is taken). */
static const char index_set_lua[] =
    LUA_PROLOGUE "local idx = KEYS[tonumber(ARGV[1])]\n"
                 "local cur, score = redis.call('ZSCORE', idx, ARGV[2]), tonumber(ARGV[3])\n"
                 "local mine = cur and tonumber(cur) == tonumber(ARGV[4])\n"
                 "if score < 0 then\n"
                 "  if mine then redis.call('ZREM', idx, ARGV[2]) end\n"
                 "elseif mine or not cur then\n"
                 "  redis.call('ZADD', idx, score, ARGV[2])\n"
                 "else\n"
                 "  redis.call('ZADD', idx, 'LT', score, ARGV[2])\n"
                 "end\n"
                 "return 1\n";

/* ARGV: user, op: 'online' (SADD), 'offline' (SREM), 'active' (ZADD act now=ARGV[3]),
 * 'restored' (ZADD NX act), 'forget' (off every index: evicted). */
static const char index_user_lua[] =
    LUA_PROLOGUE "local u, op = ARGV[1], ARGV[2]\n"
                 "if op == 'online' then redis.call('SADD', KEYS[2], u)\n"
                 "elseif op == 'offline' then redis.call('SREM', KEYS[2], u)\n"
                 "elseif op == 'active' then redis.call('ZADD', KEYS[4], ARGV[3], u)\n"
                 "elseif op == 'restored' then redis.call('ZADD', KEYS[4], 'NX', ARGV[3], u)\n"
                 "elseif op == 'forget' then\n"
                 "  redis.call('ZREM', KEYS[1], u)\n"
                 "  redis.call('SREM', KEYS[2], u)\n"
                 "  redis.call('ZREM', KEYS[3], u)\n"
                 "  redis.call('ZREM', KEYS[4], u)\n"
                 "end\n"
                 "return 1\n";

const char *store_script_source(store_script_t s)
{
    static const char *const sources[STORE_SCRIPT_COUNT] = {
        [STORE_SCRIPT_PUT] = put_lua,
        [STORE_SCRIPT_PUT_MANY] = put_many_lua,
        [STORE_SCRIPT_ACK] = ack_lua,
        [STORE_SCRIPT_BOUNCE] = bounce_lua,
        [STORE_SCRIPT_DUE] = due_lua,
        [STORE_SCRIPT_PRESENCE] = presence_lua,
        [STORE_SCRIPT_STALE] = stale_lua,
        [STORE_SCRIPT_SUMMARY] = summary_lua,
        [STORE_SCRIPT_FETCH] = fetch_lua,
        [STORE_SCRIPT_ARCHIVE_TAKE] = archive_take_lua,
        [STORE_SCRIPT_ARCHIVE_DROP] = archive_drop_lua,
        [STORE_SCRIPT_ACTIVITY] = activity_lua,
        [STORE_SCRIPT_RESTORE] = restore_lua,
        [STORE_SCRIPT_EVICT_TAKE] = evict_take_lua,
        [STORE_SCRIPT_EVICT_DROP] = evict_drop_lua,
        [STORE_SCRIPT_INDEX_PUT] = index_put_lua,
        [STORE_SCRIPT_INDEX_CLAIM] = index_claim_lua,
        [STORE_SCRIPT_INDEX_SET] = index_set_lua,
        [STORE_SCRIPT_INDEX_USER] = index_user_lua,
    };
    return sources[s];
}
