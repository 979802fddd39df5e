/* receiptd --stats: users, messages and bytes per tier, read from Redis and the SQLite archive
 * named in the config. A one-shot admin command, so it may block. */
#ifndef RECEIPTD_STATS_H
#define RECEIPTD_STATS_H

#include <stdio.h>

#include "config.h"

/* Prints the table to out. Returns 0, or 1 when a tier could not be read (said on stderr). */
int stats_print(const config_t *cfg, FILE *out);

#endif
