"""Who sends images to this archive, and the senders a site blocked.

In a disaster a new portable X-ray turns up and sends before anyone declared it: its images
must never be lost, so with DICOM_ACCESS=standard any device may store. But an undeclared
sender must not go unnoticed either. A Lua filter in Orthanc (rendered here) notes each new
calling AE title and address in a small log the first time Orthanc sees them, and refuses
C-STORE from an AE title an admin blocked. `pacs modality senders` lists who sent, and which of
them nobody declared; the admin declares them (`pacs modality add`) or blocks them. A site that
wants only declared devices sets DICOM_ACCESS=strict (Orthanc then refuses the rest itself).

The blocked list is a text file of AE titles, one per line, read by the filter for every
received image (a few bytes): blocking takes effect at once, without restarting Orthanc.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import durable
from .config import AETitle, Settings

LUA = """-- Rendered by pacs (senders.py); changes here are overwritten.
local SEEN_LOG = [==[{seen}]==]
local BLOCKED = [==[{blocked}]==]
local seen = {{}}

local function is_blocked(aet)
  local file = io.open(BLOCKED, "r")
  if file == nil then
    return false
  end
  for line in file:lines() do
    if line == aet then
      file:close()
      return true
    end
  end
  file:close()
  return false
end

function ReceivedInstanceFilter(dicom, origin, info)
  if origin["RequestOrigin"] ~= "DicomProtocol" then
    return true
  end
  local aet = origin["RemoteAet"] or ""
  local ip = origin["RemoteIp"] or ""
  local key = aet .. "|" .. ip
  if seen[key] == nil then
    seen[key] = true
    local file = io.open(SEEN_LOG, "a")
    if file ~= nil then
      local entry = {{ aet = aet, ip = ip, called = origin["CalledAet"] or "", time = os.time() }}
      file:write(string.gsub(DumpJson(entry, true), "\\n", " ") .. "\\n")
      file:close()
    end
  end
  if is_blocked(aet) then
    print("GOTG: refused an image from the blocked sender " .. aet)
    return false
  end
  return true
end
"""


def lua_file(settings: Settings) -> Path:
    return settings.state_path / "orthanc" / "senders.lua"


def seen_log(settings: Settings) -> Path:
    return settings.state_path / "orthanc" / "senders-seen.jsonl"


def blocked_file(settings: Settings) -> Path:
    return settings.state_path / "orthanc" / "senders-blocked.txt"


def write_lua(settings: Settings) -> Path:
    """The filter, next to Orthanc's rendered configuration (which lists it)."""
    paths = {"seen": str(seen_log(settings)), "blocked": str(blocked_file(settings))}
    if any("]==]" in path or "\n" in path for path in paths.values()):
        raise ValueError(f"STATE_PATH {settings.state_path} cannot be written into the filter")
    path = lua_file(settings)
    durable.replace_text(path, LUA.format(**paths), mode=0o644)
    return path


def blocked(settings: Settings) -> list[str]:
    try:
        text = blocked_file(settings).read_text()
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if line]


def set_blocked(settings: Settings, aet: str, block: bool) -> list[str]:
    """Block (or unblock) a calling AE title; the new list."""
    AETitle().parse(aet)  # a real AE title, or ValueError: the file holds nothing else
    names = [name for name in blocked(settings) if name != aet] + ([aet] if block else [])
    durable.replace_text(blocked_file(settings), "".join(f"{name}\n" for name in names),
                         mode=0o644)
    return names


def seen(settings: Settings, declared: list[dict]) -> list[dict]:
    """Every (AE title, address) that sent images, first and last noted, with whether a
    declared modality matches it (its AE title, and its address unless DICOM_ACCESS=open) and
    whether it is blocked. `declared`: Orthanc's modalities, expanded."""
    senders: dict[tuple[str, str], dict] = {}
    try:
        lines = seen_log(settings).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        try:
            entry = json.loads(line)
            key = (str(entry["aet"]), str(entry["ip"]))
            when = float(entry["time"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a power cut
        known = senders.setdefault(key, {"aet": key[0], "ip": key[1], "first_seen": when,
                                         "last_noted": when})
        known["first_seen"] = min(known["first_seen"], when)
        known["last_noted"] = max(known["last_noted"], when)
    check_host = settings.dicom_access != "open"
    stopped = set(blocked(settings))
    for sender in senders.values():
        sender["declared"] = any(
            modality.get("AET") == sender["aet"]
            and (not check_host or modality.get("Host") == sender["ip"])
            for modality in declared)
        sender["blocked"] = sender["aet"] in stopped
        sender["printable_aet"] = re.sub(r"[^\x20-\x7e]", "?", sender["aet"])
    return sorted(senders.values(), key=lambda s: s["first_seen"])
