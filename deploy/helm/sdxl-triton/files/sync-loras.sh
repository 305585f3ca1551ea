#!/bin/sh
# Keeps a server's LoRA library (docs/loras.md) equal to an object-store prefix that holds LoRAs as
# `python -m export lora add` installs them (NAME/lora.safetensors + NAME/lora.json).
#
#   sync-loras.sh LIBRARY STAGING INTERVAL_S SYNC_COMMAND...
#
# Every INTERVAL_S: SYNC_COMMAND mirrors the prefix into STAGING (aws s3 sync --delete, gcloud storage
# rsync --delete-unmatched-destination-objects); then each LoRA of STAGING whose weights match the
# sha256 its lora.json states (an upload still in progress does not) is copied beside LIBRARY and
# renamed into it, so the servers see a whole LoRA or none; a LoRA gone from the prefix is renamed
# out of LIBRARY, then deleted. The servers look names up per request: no restart.
# POSIX sh and coreutils only: it runs in the object store's CLI image.
set -u
library=$1 staging=$2 interval=$3
shift 3
mkdir -p "$library" "$staging" || exit 1

log() { echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) lora-sync: $*"; }

stated_sha256() {  # the sha256 a lora.json states for its weights
  sed -n 's/.*"sha256": *"\([0-9a-f]\{64\}\)".*/\1/p' "$1" | head -n 1
}

valid_name() {  # contract/loras.py NAME_PATTERN
  printf '%s' "$1" | grep -Eqx '[A-Za-z0-9][A-Za-z0-9_.-]{0,63}'
}

install() {
  name=$1 source=$2
  incoming="$library/.incoming-$name"
  rm -rf "$incoming" && mkdir "$incoming" && cp "$source/lora.safetensors" "$source/lora.json" "$incoming/" || return 1
  if [ -d "$library/$name" ]; then  # changed under the same name: as `lora remove` then `lora add`
    rm -rf "$library/.removed-$name" && mv "$library/$name" "$library/.removed-$name" || return 1
  fi
  mv "$incoming" "$library/$name" && rm -rf "$library/.removed-$name" && log "installed $name ($(stated_sha256 "$library/$name/lora.json"))"
}

reconcile() {
  for source in "$staging"/*/; do
    [ -d "$source" ] || continue
    name=$(basename "$source")
    valid_name "$name" || { log "skipped $name: not a LoRA name"; continue; }
    [ -f "$source/lora.json" ] && [ -f "$source/lora.safetensors" ] || continue
    wanted=$(stated_sha256 "$source/lora.json")
    [ -n "$wanted" ] || { log "skipped $name: its lora.json states no sha256"; continue; }
    if [ -f "$library/$name/lora.json" ] && [ "$(stated_sha256 "$library/$name/lora.json")" = "$wanted" ]; then
      continue  # installed already
    fi
    actual=$(sha256sum "$source/lora.safetensors" | cut -d ' ' -f 1)
    if [ "$actual" != "$wanted" ]; then
      log "waiting for $name: its weights do not match its lora.json yet (an upload in progress?)"
      continue
    fi
    install "$name" "${source%/}" || log "could not install $name"
  done
  for installed in "$library"/*/; do
    [ -d "$installed" ] || continue
    name=$(basename "$installed")
    [ -d "$staging/$name" ] && continue
    rm -rf "$library/.removed-$name" && mv "$library/$name" "$library/.removed-$name" && rm -rf "$library/.removed-$name" \
      && log "removed $name"
  done
}

trap 'exit 0' TERM INT
while :; do
  if "$@"; then
    reconcile
  else
    log "the sync from the store failed (exit $?): the library stays as it is"
  fi
  sleep "$interval" &
  wait $!
done
