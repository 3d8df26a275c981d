#!/usr/bin/env bash
# The web console's front-end files (docs/console.md): xterm.js and its fit addon at the
# versions pinned, with their integrity hashes, in scripts/console/package-lock.json, from
# the npm registry (npm ci) into emberbox/api/console/vendor/ (gitignored, never
# committed; the server serves them from there). Idempotent: nothing is fetched while
# vendor/ holds the files of this very lock.
set -euo pipefail
cd "$(dirname "$0")/.."

lock=scripts/console/package-lock.json
vendor=emberbox/api/console/vendor
files=(xterm.mjs xterm.css addon-fit.mjs)

want=$(sha256sum "$lock" | cut -d' ' -f1)
have=$(cat "$vendor/.lock-sha256" 2>/dev/null || true)
complete=1
for name in "${files[@]}"; do [ -s "$vendor/$name" ] || complete=0; done
if [ "$have" = "$want" ] && [ "$complete" = 1 ]; then
    exit 0
fi

if ! command -v npm >/dev/null; then
    echo "console-assets: npm is missing (install Node.js and npm); the console's terminal" \
         "needs these files" >&2
    exit 1
fi
echo "setup: console assets (npm ci: @xterm/xterm, @xterm/addon-fit) into $vendor"
work=$(mktemp -d)
trap 'rm -rf "$work" "$vendor.new"' EXIT
cp scripts/console/package.json "$lock" "$work/"
(cd "$work" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)

modules="$work/node_modules/@xterm"
rm -rf "$vendor.new"
mkdir -p "$vendor.new"
cp "$modules/xterm/lib/xterm.mjs" "$modules/xterm/css/xterm.css" "$vendor.new/"
cp "$modules/addon-fit/lib/addon-fit.mjs" "$vendor.new/"
cp "$modules/xterm/LICENSE" "$vendor.new/xterm.LICENSE"
cp "$modules/addon-fit/LICENSE" "$vendor.new/addon-fit.LICENSE"
echo "$want" >"$vendor.new/.lock-sha256"
rm -rf "$vendor"
mv "$vendor.new" "$vendor"
