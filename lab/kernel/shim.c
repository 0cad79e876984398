/* A kernel that ignores a flag, simulated: linked into the probe with -Wl,--wrap=syscall, it clears the bits
 * SHIM_MASK of argument SHIM_ARG (0-based) of system call SHIM_NR before making the call, and returns what the
 * real call returns.  Built only by tests and `stonelab kernel probe --shim`, to show that the probe reports such
 * a kernel as wrong-semantics rather than supported.  Written for stonelab; no upstream code.
 */
#include <stdarg.h>

long __real_syscall(long number, ...);

long __wrap_syscall(long number, ...) {
    long a[6];
    va_list ap;
    va_start(ap, number);
    for (int i = 0; i < 6; i++) a[i] = va_arg(ap, long);
    va_end(ap);
    if (number == SHIM_NR) a[SHIM_ARG] &= ~(long)SHIM_MASK;
    return __real_syscall(number, a[0], a[1], a[2], a[3], a[4], a[5]);
}
