/* Prints one of receiptd's Lua scripts, so benchmarks run exactly the code receiptd runs. */
#include <stdio.h>
#include <string.h>

#include "scripts.h"

int main(int argc, char **argv)
{
    static const char *const names[STORE_SCRIPT_COUNT] = {
        [STORE_SCRIPT_PUT] = "put",     [STORE_SCRIPT_PUT_MANY] = "put_many",
        [STORE_SCRIPT_ACK] = "ack",     [STORE_SCRIPT_BOUNCE] = "bounce",
        [STORE_SCRIPT_DUE] = "due",     [STORE_SCRIPT_PRESENCE] = "presence",
        [STORE_SCRIPT_STALE] = "stale", [STORE_SCRIPT_SUMMARY] = "summary",
        [STORE_SCRIPT_FETCH] = "fetch"};
    for (int i = 0; argc == 2 && i < STORE_SCRIPT_COUNT; i++)
        if (names[i] && strcmp(argv[1], names[i]) == 0) {
            fputs(store_script_source((store_script_t)i), stdout);
            return 0;
        }
    fprintf(stderr,
            "usage: dump_script put|put_many|ack|bounce|due|presence|stale|summary|fetch\n");
    return 2;
}
