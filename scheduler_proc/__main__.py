import sys

from scheduler_proc.core import run_scheduler

run_scheduler(sys.argv[1])
