/* Callgrind's client requests as functions, for ctypes (they are macros in valgrind/callgrind.h).
   Outside valgrind each request is a few no-op instructions, so calling them there is harmless. */
#include <valgrind/callgrind.h>

/* Whether this process runs under valgrind (0 natively). */
int quill_cg_running(void) { return RUNNING_ON_VALGRIND; }

/* Forget what was counted so far and start counting. */
void quill_cg_start(void) {
    CALLGRIND_ZERO_STATS;
    CALLGRIND_START_INSTRUMENTATION;
}

/* Stop counting and write what was counted since quill_cg_start to a dump file described by `label`. */
void quill_cg_stop(const char* label) {
    CALLGRIND_STOP_INSTRUMENTATION;
    CALLGRIND_DUMP_STATS_AT(label);
}
