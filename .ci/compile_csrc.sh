#!/usr/bin/env bash
# Compile-check the pure-CUDA kernels in csrc/ without a GPU.
#
#   1. nvcc -c csrc/stage_transition.cu for sm_80 and sm_90 (+ PTX for compute_90),
#      with the same flags setup.py uses (-O3 -lineinfo, no fast math);
#   2. the host-only reference csrc/host_reference.h with the host C++ compiler;
#   3. the standalone CMake project (library + GPU self-test) in a temporary build dir,
#      when cmake is available.
# Exits nonzero on any compile error; exits 0 with a message when nvcc is absent.
# Env: RALU_CI_SKIP_CMAKE=1 skips step 3; NVCC / CXX override the compilers.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "nvcc not found: skipping CUDA compile check"
  exit 0
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/ralu_csrc_XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

echo "== nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'): csrc/stage_transition.cu for sm_80, sm_90"
start=$SECONDS
"$NVCC" -c -O3 -lineinfo -std=c++17 --threads 0 \
  -gencode arch=compute_80,code=sm_80 \
  -gencode arch=compute_90,code=sm_90 \
  -gencode arch=compute_90,code=compute_90 \
  -I"$ROOT/csrc" "$ROOT/csrc/stage_transition.cu" -o "$TMP/stage_transition.o"
echo "   ok ($((SECONDS - start)) s)"

CXX_BIN="${CXX:-}"
if [[ -z "$CXX_BIN" ]]; then
  for cand in g++ c++ clang++; do
    if command -v "$cand" >/dev/null 2>&1; then CXX_BIN="$cand"; break; fi
  done
fi
if [[ -n "$CXX_BIN" ]]; then
  echo "== $CXX_BIN: csrc/host_reference.h (host-only)"
  printf '#include "host_reference.h"\nint main() { return ralu_host::randint4x(42u, 7u).c0 == 0u ? 1 : 0; }\n' > "$TMP/host_ref_check.cpp"
  "$CXX_BIN" -std=c++14 -O2 -Wall -Wextra -Werror -ffp-contract=off -I"$ROOT/csrc" "$TMP/host_ref_check.cpp" -o "$TMP/host_ref_check"
  "$TMP/host_ref_check"
  echo "   ok"
fi

if [[ "${RALU_CI_SKIP_CMAKE:-0}" != "1" ]] && command -v cmake >/dev/null 2>&1; then
  echo "== cmake: library ralu_transition + transition_selftest (CMAKE_CUDA_ARCHITECTURES=80;90)"
  start=$SECONDS
  cmake -S "$ROOT" -B "$TMP/build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$(command -v "$NVCC")" \
    -DCMAKE_CUDA_ARCHITECTURES="80;90" >"$TMP/cmake_configure.log" 2>&1 || { cat "$TMP/cmake_configure.log"; exit 1; }
  cmake --build "$TMP/build" -j "$(nproc 2>/dev/null || echo 2)" >"$TMP/cmake_build.log" 2>&1 || { cat "$TMP/cmake_build.log"; exit 1; }
  echo "   ok ($((SECONDS - start)) s)"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "== GPU visible: running transition_selftest"
    "$TMP/build/transition_selftest"
  fi
else
  echo "== cmake build skipped"
fi

echo "csrc compile check: OK"
