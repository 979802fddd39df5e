/* Prints one of receiptd's Lua scripts, so benchmarks run exactly the code receiptd runs. */
#include <stdio.h>
#include <string.h>

#include "scripts.h"

int main(int argc, char **argv)
{
    static const char *const names[STORE_SCRIPT_COUNT] = {
        "put", "ack", "bounce", "due", "presence", "stale", "summary", "fetch"};
    for (int i = 0; argc == 2 && i < STORE_SCRIPT_COUNT; i++)
        if (strcmp(argv[1], names[i]) == 0) {
            fputs(store_script_source((store_script_t)i), stdout);
            return 0;
        }
    fprintf(stderr, "usage: dump_script put|ack|bounce|due|presence|stale|summary|fetch\n");
    return 2;
}
