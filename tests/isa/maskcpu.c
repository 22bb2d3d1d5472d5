// An x86 CPU without VNNI, on any x86 CPU: an LD_PRELOAD library that hides AVX-512, VNNI (AVX512-VNNI, AVX-VNNI)
// and AMX from CPUID, so the libraries that pick their kernels by CPUID (ONNX Runtime's MLAS, OpenVINO's oneDNN)
// take the ones they take on an AVX2 CPU without VNNI: the same arithmetic (ONNX Runtime's saturating u8s8
// kernels included), timed on this CPU's cores.
//
//   gcc -O2 -shared -fPIC -o /tmp/maskcpu.so tests/isa/maskcpu.c
//   LD_PRELOAD=/tmp/maskcpu.so qbench compare ...      # "CPU: ... with VNNI hidden from CPUID" under the table
//
// How: Linux CPUID faulting (arch_prctl ARCH_SET_CPUID; /proc/cpuinfo flag cpuid_fault) makes every CPUID
// instruction of the process raise SIGSEGV; the handler runs the real CPUID, clears the bits, and steps over it.
// The setting survives fork and clone and the preload comes back after exec. Without cpuid_fault it exits (3).
// Checked against a real AMD EPYC with AVX2 and no VNNI: the same gtsdb4 INT8 model with ONNX Runtime's default
// kernels scores the same mAP to the last digit (docs/cpus.md). tests/test_runtime.py uses it.
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <stdio.h>
#include <ucontext.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <asm/prctl.h>

static int set_cpuid(int on) { return (int)syscall(SYS_arch_prctl, ARCH_SET_CPUID, on); }

static void mask(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    if (leaf == 7 && sub == 0) {
        r[1] &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31));
        r[2] &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        r[3] &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        r[0] &= ~((1u << 4) | (1u << 5) | (1u << 23));
        r[3] &= ~((1u << 4) | (1u << 5) | (1u << 10));
    } else if (leaf == 0xd && sub == 0) {
        r[0] &= ~((1u << 5) | (1u << 6) | (1u << 7) | (1u << 17) | (1u << 18));  // AVX-512 and AMX state
    }
}

static void on_segv(int sig, siginfo_t *si, void *ctx) {
    ucontext_t *uc = (ucontext_t *)ctx;
    greg_t *g = uc->uc_mcontext.gregs;
    const uint8_t *ip = (const uint8_t *)g[REG_RIP];
    if (ip[0] == 0x0f && ip[1] == 0xa2) {
        uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX], r[4];
        set_cpuid(1);
        __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
        set_cpuid(0);
        mask(leaf, sub, r);
        g[REG_RAX] = r[0]; g[REG_RBX] = r[1]; g[REG_RCX] = r[2]; g[REG_RDX] = r[3];
        g[REG_RIP] += 2;
        return;
    }
    signal(SIGSEGV, SIG_DFL);  // a real fault: die as without us
}

__attribute__((constructor)) static void init(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, NULL);
    if (set_cpuid(0) != 0) { perror("maskcpu: ARCH_SET_CPUID (no cpuid_fault on this CPU?)"); _exit(3); }
}
