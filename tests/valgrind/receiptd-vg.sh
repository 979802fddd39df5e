#!/bin/sh
# Runs receiptd ($RECEIPTD_REAL) under valgrind: any memory error, or a definite or indirect leak
# at exit, turns the exit code into 99, which the test harnesses (they require exit 0 on SIGTERM)
# report as a failure.
exec valgrind -q --leak-check=full --show-leak-kinds=definite,indirect \
  --errors-for-leak-kinds=definite,indirect --error-exitcode=99 "$RECEIPTD_REAL" "$@"
