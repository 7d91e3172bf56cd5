-- wrk script of `cargo xtask soak`: cycles through the soak app's handlers
-- and pauses between a connection's requests (`-- PAUSE_MS`), so the load is
-- bounded below saturation and latency measures service, not queueing.
local paths = {"/gen", "/exc", "/threads", "/json", "/hash", "/gc"}
local n = 0
local pause = 40

function init(args)
  pause = tonumber(args[1]) or pause
  -- Threads start at different handlers.
  n = math.random(#paths)
end

function request()
  n = n + 1
  return wrk.format("GET", paths[(n % #paths) + 1])
end

function delay()
  return pause
end
