#!/usr/bin/env bash
# Makes `cargo build --features ...cuda` (and Burn's JIT CPU backend) build
# without reaching GitHub.
#
# Burn 0.22's CUDA runtime links LLVM 23.1 through cubecl-llvm, whose build
# dependency tracel-llvm-bundler downloads an LLVM bundle from GitHub unless
# its cache folder already holds one (marked by `.tracel-llvm-installed`).
# PyPI carries a relocatable static LLVM 23.1 with the NVPTX target
# (mlc-llvm-static); this script installs it in a private venv and links it
# in as that cache, after which the bundler downloads nothing and cubecl-llvm
# links the kit through its `llvm-config`. libcuda itself is loaded at run
# time: the build needs neither a GPU nor the CUDA toolkit.
#
# Usage: scripts/setup-cuda.sh        (idempotent; prints the kit's path)
# Where: FEDVEIL_LLVM_KIT (default ~/.local/share/fedveil/llvm-kit) for the
# venv; the cache is where the bundler looks, $XDG_DATA_HOME or
# ~/.local/share, under tracel/.
set -euo pipefail

# The versions the bundler pinned for Burn 0.22.1 / cubecl 0.11.3.
readonly BUNDLE=tracel-llvm-23.1.0-4
readonly KIT_PACKAGE='mlc-llvm-static[all]==23.1.1.post0'

data_home=${XDG_DATA_HOME:-$HOME/.local/share}
kit=${FEDVEIL_LLVM_KIT:-$data_home/fedveil/llvm-kit}
cache=$data_home/tracel/$BUNDLE

if [ ! -x "$kit/bin/python" ]; then
  python3 -m venv "$kit"
fi
if ! "$kit/bin/python" -m mlc_llvm_static.config --prefix > /dev/null 2>&1; then
  "$kit/bin/pip" install --quiet --disable-pip-version-check "$KIT_PACKAGE"
fi
prefix=$("$kit/bin/python" -m mlc_llvm_static.config --prefix)
version=$("$prefix/bin/llvm-config" --version)
case "$version" in
  23.1.*) ;;
  *) echo "setup-cuda: $prefix/bin/llvm-config reports LLVM $version, expected 23.1" >&2; exit 1 ;;
esac
if ! "$prefix/bin/llvm-config" --targets-built | grep -qw NVPTX; then
  echo "setup-cuda: the LLVM kit at $prefix lacks the NVPTX target" >&2; exit 1
fi

mkdir -p "$(dirname "$cache")"
if [ -e "$cache" ] && [ ! -L "$cache" ]; then
  echo "setup-cuda: $cache exists and is not this kit; leaving it as it is" >&2
else
  ln -sfn "$prefix" "$cache"
fi
touch "$cache/.tracel-llvm-installed"
echo "LLVM $version for Burn's CUDA backend: $cache -> $prefix"
echo "now: cargo build --release --features fedveil-sim/cuda,fedveil-client/cuda,fedveil-server/cuda"
