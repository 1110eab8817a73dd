// Helpers shared by the NVRTC-compiled kernels (no CUDA headers: NVRTC builds them without an include path
// besides this directory; kernels/cuda_jit.py).
#pragma once

typedef unsigned int u32;
typedef unsigned short u16;

#define DEV __device__ __forceinline__

DEV uint4 ld_nc(const uint4* p) {  // read-only global load (never written while the kernel runs)
  uint4 v;
  asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

DEV u32 ld_nc32(const u32* p) {
  u32 v;
  asm("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

// Programmatic dependent launch (kernels/pdl.py): wait = the previous kernel has finished and its writes
// are visible; trigger = the next kernel may launch.
DEV void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
DEV void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

DEV u16 f32_to_f16(float f) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

DEV float f16_to_f32(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
