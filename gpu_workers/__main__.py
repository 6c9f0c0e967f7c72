import sys

from gpu_workers.worker import run_worker

run_worker(sys.argv[1], int(sys.argv[2]))
