#!/usr/bin/env bash
# Install perf_analyzer into build/perf-analyzer without touching the system.
# The PyPI binary (perf-analyzer 2.60.0) needs glibc >= 2.38. Where the system glibc is older (Debian 12
# has 2.36), Debian 13's libc6, libstdc++6 and libgcc-s1 are unpacked into a private folder and the
# binary is started through that folder's dynamic loader. Prints the path of the runnable wrapper.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${PERF_ANALYZER_DIR:-build/perf-analyzer}
VERSION=${PERF_ANALYZER_VERSION:-2.60.0}
WRAPPER="$DEST/perf_analyzer"
if [ -x "$WRAPPER" ] && "$WRAPPER" --version >/dev/null 2>&1; then echo "$WRAPPER"; exit 0; fi
mkdir -p "$DEST"
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --platform manylinux_2_38_x86_64 --python-version 3.11 "perf-analyzer==$VERSION" -d "$DEST/wheel" 2>&1 \
  | grep -v "is ignored: it is neither" >&2 || true
rm -rf "$DEST/pkg" && mkdir -p "$DEST/pkg"
"$PY" -c "import sys, zipfile, glob; zipfile.ZipFile(glob.glob(sys.argv[1] + '/perf_analyzer-*.whl')[0]).extractall(sys.argv[2])" \
  "$DEST/wheel" "$DEST/pkg"
BINARY="$(pwd)/$DEST/pkg/perf_analyzer/bin/perf_analyzer"
chmod +x "$BINARY"
glibc=$(getconf GNU_LIBC_VERSION | awk '{print $2}')
if [ "$(printf '%s\n2.38\n' "$glibc" | sort -V | head -1)" = "2.38" ]; then
  printf '#!/bin/sh\nexec "%s" "$@"\n' "$BINARY" > "$WRAPPER"
else
  APT="$DEST/apt"
  mkdir -p "$APT/sources" "$APT/lists/partial" "$APT/cache" "$APT/debs"
  printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    > "$APT/sources/trixie.sources"
  : > "$APT/empty.list"
  opts=(-q -o "Dir::Etc::SourceList=$(pwd)/$APT/empty.list" -o "Dir::Etc::SourceParts=$(pwd)/$APT/sources"
        -o "Dir::State::Lists=$(pwd)/$APT/lists" -o "Dir::Cache=$(pwd)/$APT/cache" -o "APT::Sandbox::User=root")
  apt-get "${opts[@]}" update >&2
  (cd "$APT/debs" && apt-get "${opts[@]}" download libc6 libstdc++6 libgcc-s1 >&2)
  rm -rf "$DEST/runtime"
  for deb in "$APT"/debs/*.deb; do dpkg -x "$deb" "$DEST/runtime"; done
  LIBS="$(pwd)/$DEST/runtime/usr/lib/x86_64-linux-gnu"
  printf '#!/bin/sh\n# perf_analyzer through a private glibc (the system one is older than 2.38)\nexec "%s/ld-linux-x86-64.so.2" --library-path "%s:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" "%s" "$@"\n' \
    "$LIBS" "$LIBS" "$BINARY" > "$WRAPPER"
fi
chmod +x "$WRAPPER"
"$WRAPPER" --version >&2
echo "$WRAPPER"
