"""Every CUDA tensor of a process in managed memory: PyTorch's pluggable allocator over a small
C++ shim, compiled at run time, that calls ``cuMemAllocManaged``.

The shim links nothing: Python hands it the driver's entry points (``libcuda.so.1``, the
library PyTorch itself runs on), so it builds with any C++ compiler and no CUDA headers.

- **Caching.** ``cuMemFree`` synchronises the device, and PyTorch frees tensors every step; so
  a freed block is kept and handed out again for a request of the same size (a training epoch
  asks for the same sizes every time), as PyTorch's own allocator caches device blocks.
- **Policy.** ``host-preferred``: each block is advised to live in host memory and be mapped for
  the GPU (``SetPreferredLocation`` CPU, ``SetAccessedBy`` the device): kernels read and write
  it over PCIe, nothing migrates (zero-copy). ``migrating``: no advice, the driver's default:
  pages move to the GPU on first touch and back under pressure. :func:`set_policy` re-advises
  every block the shim holds; switching to ``migrating`` also prefetches each block to the
  device (``cuMemPrefetchAsync``), since a block advised host-preferred before stays mapped for
  the GPU, is read over PCIe without a fault, and would never migrate (on the H200 such a
  "migrating" run took 5 s an epoch with 352 MiB on the device).
- **Safety.** Managed memory beyond what the GPU has free can hang a shared GPU when it is
  oversubscribed, so the shim holds at most ``limit`` bytes (the caller passes the free device
  memory) and a request past it raises PyTorch's out-of-memory error instead of allocating.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["POLICIES", "SHIM_SOURCE", "Shim", "build_shim", "free_device_memory"]

#: The two placement policies, by the name the results carry.
POLICIES = ("migrating", "host-preferred")

# CUmem_advise values (cuda.h): set/unset preferred location, set/unset accessed by.
SHIM_SOURCE = r"""
#include <cstddef>
#include <mutex>
#include <stdexcept>
#include <string>
#include <sys/types.h>

typedef int (*alloc_t)(unsigned long long*, size_t, unsigned int);
typedef int (*free_t)(unsigned long long);
typedef int (*advise_t)(unsigned long long, size_t, int, int);
typedef int (*prefetch_t)(unsigned long long, size_t, int, void*);

namespace {
alloc_t alloc_managed = nullptr;
free_t free_managed = nullptr;
advise_t advise = nullptr;
prefetch_t prefetch = nullptr;
size_t limit = 0, held = 0, in_use = 0, peak = 0;
int host_preferred = 1, device_id = 0;
const int kBlocks = 1 << 16;
struct Block { void* ptr; size_t size; int used; };
Block blocks[kBlocks];
int count = 0;
std::mutex lock;  // autograd allocates from its device thread too

int apply(const Block& b) {
  unsigned long long p = (unsigned long long)b.ptr;
  if (host_preferred) {
    int err = advise(p, b.size, 3, -1);  // preferred location: the CPU
    return err ? err : advise(p, b.size, 5, device_id);  // accessed by: the device
  }
  int err = advise(p, b.size, 4, device_id);  // unset preferred location
  err = err ? err : advise(p, b.size, 6, device_id);  // unset accessed by
  return err ? err : prefetch(p, b.size, device_id, nullptr);  // move it now, on stream 0
}
}  // namespace

extern "C" {
void aires_uvm_setup(void* a, void* f, void* adv, void* pre, size_t lim, int device) {
  alloc_managed = (alloc_t)a; free_managed = (free_t)f; advise = (advise_t)adv;
  prefetch = (prefetch_t)pre; limit = lim; device_id = device;
}

int aires_uvm_set_policy(int host) {
  std::lock_guard<std::mutex> guard(lock);
  host_preferred = host;
  for (int i = 0; i < count; ++i) {
    int err = apply(blocks[i]);
    if (err) return err;
  }
  return 0;
}

size_t aires_uvm_stat(int which) {
  return which == 0 ? in_use : which == 1 ? peak : held;
}

void* aires_uvm_try_malloc(ssize_t size, int device, void* stream) {
  std::lock_guard<std::mutex> guard(lock);
  if (size <= 0) size = 1;
  for (int i = 0; i < count; ++i) {
    if (!blocks[i].used && blocks[i].size == (size_t)size) {  // a freed block, reused
      blocks[i].used = 1;
      in_use += size;
      if (in_use > peak) peak = in_use;
      return blocks[i].ptr;
    }
  }
  if (held + size > limit || count == kBlocks) return nullptr;
  unsigned long long p = 0;
  if (alloc_managed(&p, size, 1) != 0) return nullptr;  // CU_MEM_ATTACH_GLOBAL
  blocks[count] = Block{(void*)p, (size_t)size, 1};
  if (apply(blocks[count]) != 0) { free_managed(p); return nullptr; }
  ++count;
  held += size;
  in_use += size;
  if (in_use > peak) peak = in_use;
  return (void*)p;
}

void* aires_uvm_malloc(ssize_t size, int device, void* stream) {
  void* p = aires_uvm_try_malloc(size, device, stream);
  if (!p) {
    throw std::runtime_error(
        "CUDA out of memory: managed memory of " + std::to_string(held) + " bytes plus " +
        std::to_string(size) + " would pass the limit of " + std::to_string(limit) +
        " bytes (the GPU's free memory at the start)");
  }
  return p;
}

void aires_uvm_free(void* ptr, ssize_t size, int device, void* stream) {
  std::lock_guard<std::mutex> guard(lock);
  for (int i = 0; i < count; ++i) {
    if (blocks[i].ptr == ptr && blocks[i].used) {
      blocks[i].used = 0;
      in_use -= blocks[i].size;
      return;
    }
  }
}
}
"""


def free_device_memory(device: int) -> int:
    """The device's free bytes, asked of the driver (``cuMemGetInfo`` in its primary context)
    rather than of ``torch.cuda``, which would initialise PyTorch's allocator before the shim
    can replace it.

    Raises:
        RuntimeError: a driver call failed (its name and ``CUresult``).
    """
    cuda = ctypes.CDLL("libcuda.so.1")
    handle, context = ctypes.c_int(0), ctypes.c_void_p(0)
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    calls = [("cuInit", (ctypes.c_uint(0),)),
             ("cuDeviceGet", (ctypes.byref(handle), ctypes.c_int(device))),
             ("cuDevicePrimaryCtxRetain", (ctypes.byref(context), handle)),
             ("cuCtxPushCurrent_v2", (context,)),
             ("cuMemGetInfo_v2", (ctypes.byref(free), ctypes.byref(total))),
             ("cuCtxPopCurrent_v2", (ctypes.byref(context),))]
    for name, args in calls:
        err = getattr(cuda, name)(*args)
        if err:
            raise RuntimeError(f"uvm: {name} failed with CUresult {err}")
    # The primary context stays retained: PyTorch runs in the same one.
    return int(free.value)


def build_shim(directory: str | Path | None = None) -> Path:
    """Compile :data:`SHIM_SOURCE` into a shared library (once per source text) and return it.

    Raises:
        RuntimeError: no C++ compiler, or it failed (its message included).
    """
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise RuntimeError(
            "uvm needs a C++ compiler (c++, g++ or clang++) to build its managed-memory "
            "allocator shim; none is on PATH"
        )
    digest = hashlib.sha256(SHIM_SOURCE.encode()).hexdigest()[:16]
    out = Path(directory or tempfile.gettempdir()) / f"aires-uvm-{digest}.so"
    if out.is_file():
        return out
    source = out.with_suffix(".cpp")
    source.write_text(SHIM_SOURCE)
    partial = out.with_suffix(f".{digest}.tmp")
    done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(partial), str(source)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"uvm: compiling the allocator shim failed: {done.stderr[-1500:]}")
    partial.rename(out)
    return out


class Shim:
    """The compiled shim, wired to allocation and advice functions.

    Args:
        path: the library from :func:`build_shim`.
        alloc, free, advise, prefetch: addresses of ``cuMemAllocManaged``, ``cuMemFree_v2``,
            ``cuMemAdvise`` and ``cuMemPrefetchAsync`` (or functions of the same signatures).
        limit: bytes the shim may hold in all.
        device: the device the blocks are mapped for.
    """

    def __init__(self, path: Path, alloc: int, free: int, advise: int, prefetch: int,
                 limit: int, device: int) -> None:
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self.lib.aires_uvm_setup.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_size_t,
                                                                     ctypes.c_int]
        self.lib.aires_uvm_stat.restype = ctypes.c_size_t
        self.lib.aires_uvm_try_malloc.restype = ctypes.c_void_p
        self.lib.aires_uvm_try_malloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int,
                                                  ctypes.c_void_p]
        self.lib.aires_uvm_free.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int,
                                            ctypes.c_void_p]
        self.lib.aires_uvm_setup(alloc, free, advise, prefetch, limit, device)

    @classmethod
    def for_device(cls, path: Path, limit: int, device: int) -> Shim:
        """The shim over the CUDA driver of this process (``libcuda.so.1``)."""
        cuda = ctypes.CDLL("libcuda.so.1")
        entry = [ctypes.cast(getattr(cuda, name), ctypes.c_void_p).value
                 for name in ("cuMemAllocManaged", "cuMemFree_v2", "cuMemAdvise",
                              "cuMemPrefetchAsync")]
        return cls(path, *entry, limit=limit, device=device)

    def set_policy(self, policy: str) -> None:
        """Advise every block held, and every later one, by ``policy`` (:data:`POLICIES`);
        ``migrating`` also prefetches them to the device (queued on the default stream).

        Raises:
            ValueError: an unknown policy.
            RuntimeError: the driver refused the advice (its error code).
        """
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        err = self.lib.aires_uvm_set_policy(int(policy == "host-preferred"))
        if err:
            raise RuntimeError(f"uvm: cuMemAdvise or cuMemPrefetchAsync failed with CUresult "
                               f"{err}")

    def preferred_location(self, ptr: int, nbytes: int) -> int:
        """The driver's preferred location of a managed range: ``-1`` the CPU, ``-2`` none,
        else a device ordinal (``cuMemRangeGetAttribute``), to check that advice took."""
        cuda = ctypes.CDLL("libcuda.so.1")
        value = ctypes.c_int(0)
        err = cuda.cuMemRangeGetAttribute(ctypes.byref(value), ctypes.c_size_t(4),
                                          ctypes.c_int(2), ctypes.c_ulonglong(ptr),
                                          ctypes.c_size_t(nbytes))
        if err:
            raise RuntimeError(f"uvm: cuMemRangeGetAttribute failed with CUresult {err}")
        return value.value

    @property
    def in_use(self) -> int:
        """Bytes of live tensors."""
        return int(self.lib.aires_uvm_stat(0))

    @property
    def peak(self) -> int:
        """Most bytes of live tensors at once."""
        return int(self.lib.aires_uvm_stat(1))

    @property
    def held(self) -> int:
        """Managed bytes allocated, free blocks kept for reuse included."""
        return int(self.lib.aires_uvm_stat(2))
