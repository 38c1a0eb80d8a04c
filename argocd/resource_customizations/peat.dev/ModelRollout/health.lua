-- Argo CD health of a peat.dev ModelRollout (Lua 5.1, Argo CD resource customization).
-- Healthy when Converged (and, with spec.serving, every target's model server serves the version);
-- Suspended when paused; Degraded on an abort, a rollback, failed targets, or converged targets
-- whose server stopped serving; Progressing otherwise (including before the controller has seen
-- the latest spec).
local hs = {}

local function condition(status, type)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

local function progress(status)
  local converged = status.converged or 0
  local total = status.totalNodes or 0
  return tostring(converged) .. "/" .. tostring(total) .. " nodes converged"
end

if obj.spec ~= nil and obj.spec.paused == true then
  hs.status = "Suspended"
  hs.message = "Paused"
  if obj.status ~= nil then
    hs.message = "Paused: " .. progress(obj.status)
  end
  return hs
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the controller"
  return hs
end

local generation = obj.metadata.generation or 0
if status.observedGeneration == nil or status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the controller to observe generation " .. tostring(generation)
  return hs
end

local degraded = condition(status, "Degraded")
if status.phase == "Failed" or status.phase == "RolledBack" or status.phase == "Degraded"
    or (degraded ~= nil and degraded.status == "True") then
  hs.status = "Degraded"
  if degraded ~= nil and degraded.message ~= nil and degraded.message ~= "" then
    hs.message = degraded.message
  else
    hs.message = "Rollout " .. tostring(status.phase)
  end
  return hs
end

local converged = condition(status, "Converged")
if converged ~= nil and converged.status == "True" then
  local total = status.totalNodes or 0
  local serving = status.serving or 0
  if obj.spec ~= nil and obj.spec.serving ~= nil and serving < total then
    hs.status = "Degraded"
    hs.message = tostring(serving) .. "/" .. tostring(total) .. " nodes serving " .. tostring(obj.spec.version)
      .. "; " .. tostring(status.staged or 0) .. " staged on disk but not served"
    return hs
  end
  hs.status = "Healthy"
  hs.message = converged.message or progress(status)
  return hs
end

local ready = condition(status, "Ready")
hs.status = "Progressing"
if ready ~= nil and ready.status == "False" and ready.message ~= nil then
  hs.message = ready.message
else
  hs.message = progress(status)
end
return hs
